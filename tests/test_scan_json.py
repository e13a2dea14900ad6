"""`edge-agent scan --format json`: the one-shot command's summary as data for scripts (issue 17: "accept
`--format json` everywhere"). A cron job or an import script that drops files and runs `scan` must learn what
happened to each file without parsing sentences: counts, every quarantined file with its reason, every file
left in the inbox with why, the exit code. Real CLI subprocess, real database, real folders.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from conftest import rows, run_agent
from bundle_factory import TEST_PUBLIC_KEY


def _scan(dirs: dict[str, Path], bundle: Path, *extra: str):
    return run_agent("scan", "--inbox", str(dirs["inbox"]), "--db", str(dirs["db"]), "--model", str(bundle),
                     "--trusted-keys", str(TEST_PUBLIC_KEY), "--workers", "1", "--threads", "1",
                     "--quiet-seconds", "0", *extra)


def _inbox(dirs: dict[str, Path], example_images: list[Path]) -> bytes:
    good = example_images[0].read_bytes()
    shutil.copy(example_images[1], dirs["inbox"] / "fine.jpg")
    shutil.copy(example_images[2], dirs["inbox"] / "other.jpg")
    shutil.copy(example_images[1], dirs["inbox"] / "again.jpg")              # a duplicate of fine.jpg
    (dirs["inbox"] / "notes.txt").write_text("not a photo\n")                # quarantined: not an image
    (dirs["inbox"] / "half.jpg").write_bytes(good[: len(good) // 2])         # young and truncated: left, named
    (dirs["inbox"] / ".DS_Store").write_bytes(b"\0" * 16)                    # hidden: left alone, counted
    return good


def test_scan_json_says_what_happened_to_every_file(dirs, bundle_dir, example_images) -> None:
    _inbox(dirs, example_images)
    r = _scan(dirs, bundle_dir, "--format", "json")
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads(r.stdout)  # stdout is the JSON document alone (log lines go to stderr)
    assert report["exit_code"] == 1 and report["complete"] is False
    c = report["counts"]
    assert (c["processed"], c["duplicates"], c["quarantined"]) == (2, 1, 1), report
    assert c["processed"] == len(rows(dirs["db"], "SELECT id FROM results"))
    assert c["flagged"] == len(rows(dirs["db"], "SELECT id FROM results WHERE needs_review = 1"))
    [q] = report["quarantined"]
    assert q["file"] == "notes.txt" and "not a supported image" in q["reason"], q
    [left] = report["left_in_inbox"]
    assert left["file"] == "half.jpg" and left["why"].startswith("truncated") and left["changed_s_ago"] >= 0, left
    assert report["hidden_files"] == 1 and report["partial_timeout_s"] == 600
    assert "did not get an outcome" in r.stderr  # the person-facing hint stays on stderr


def test_scan_json_of_a_complete_scan_and_the_json_alias(dirs, bundle_dir, example_images) -> None:
    shutil.copy(example_images[1], dirs["inbox"] / "fine.jpg")
    r = _scan(dirs, bundle_dir, "--json")
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["complete"] is True and report["counts"]["processed"] == 1 and report["left_in_inbox"] == []


def test_scan_text_summary_is_unchanged(dirs, bundle_dir, example_images) -> None:
    """The default stays the sentences a person reads (the same data, rendered)."""
    _inbox(dirs, example_images)
    r = _scan(dirs, bundle_dir)
    assert r.returncode == 1
    out = r.stdout
    assert out.startswith("screened the inbox in ") and "  processed:                2\n" in out, out
    assert "  duplicates skipped:       1\n" in out and "  quarantined notes.txt: not a supported image" in out
    assert "  left in the inbox: half.jpg (truncated: possibly still being copied; changed " in out
    assert "  left alone: 1 hidden file(s) (names starting with a dot, e.g. .DS_Store); rename without the dot" in out
    assert "quarantined once unchanged for 600 s (partial_timeout_seconds)" in out


def test_scan_json_keeps_a_name_that_is_not_utf8(dirs, bundle_dir, example_images) -> None:
    """A name with bytes that are not UTF-8 is a valid JSON escape that turns back into the original bytes."""
    import os

    raw = b"caf\xe9.txt"
    with open(os.path.join(os.fsencode(dirs["inbox"]), raw), "wb") as f:
        f.write(b"plain text, not an image\n")
    r = _scan(dirs, bundle_dir, "--format", "json")
    assert r.returncode == 0, r.stdout + r.stderr
    [q] = json.loads(r.stdout)["quarantined"]
    assert os.fsencode(q["file"]) == raw, q
