"""`edge-agent review` as a command: the static export, start-up errors, the server's refusals."""
from __future__ import annotations

import os
import re
import stat
import urllib.error
import urllib.request

import pytest

pytest.importorskip("flask", reason="the review app needs the [review] extra (Flask)")

from conftest import rows, run_agent  # noqa: E402
from review_server import start_review  # noqa: E402
from review_site import make_site  # noqa: E402


def test_static_export_is_self_contained(dirs, bundle_dir, tmp_path) -> None:
    site = make_site(dirs, bundle_dir)
    out = tmp_path / "usb" / "review"
    r = run_agent("review", "--db", str(site.db), "--inbox", str(dirs["inbox"]), "--model", str(bundle_dir),
                  "--export", str(out), "--all")
    assert r.returncode == 0, r.stderr
    assert "9 cases, 9 thumbnails" in r.stdout
    page = (out / "index.html").read_text()
    assert stat.S_IMODE(out.stat().st_mode) == 0o700 and stat.S_IMODE((out / "index.html").stat().st_mode) == 0o600
    refs = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert refs and all(not re.match(r"^[a-z]+:|^//|^/", x) for x in refs), refs  # relative only
    for ref in refs:
        assert (out / ref).is_file(), ref
        assert (out / ref).resolve().is_relative_to(out.resolve())
    thumbs = [x for x in refs if x.startswith("img/") and not x.endswith("-heat.jpg")]
    assert len(thumbs) == 9 and all((out / t).read_bytes()[:2] == b"\xff\xd8" for t in thumbs)
    assert "<script" not in page and "&lt;script&gt;alert" in page
    assert page.count("<rect ") == 9 * 7
    heat = [x for x in refs if x.endswith("-heat.jpg")]
    assert heat or page.count("no heatmap: this bundle has no feature output") == 9
    css = (out / "review.css").read_text()
    assert "http" not in css and "url(" not in css
    # flagged only (the default), and a folder holding other files is refused
    r2 = run_agent("review", "--db", str(site.db), "--inbox", str(dirs["inbox"]), "--model", str(bundle_dir),
                   "--export", str(out))
    flagged = rows(site.db, "SELECT count(*) FROM results WHERE needs_review = 1")[0][0]
    assert r2.returncode == 0 and f"{flagged} cases" in r2.stdout
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.docx").write_text("x")
    r3 = run_agent("review", "--db", str(site.db), "--inbox", str(dirs["inbox"]), "--export", str(tmp_path / "busy"))
    assert r3.returncode == 2 and "already holds other files" in r3.stderr
    assert (tmp_path / "busy" / "thesis.docx").read_text() == "x"


def test_export_with_a_missing_image_says_so(dirs, bundle_dir, tmp_path) -> None:
    site = make_site(dirs, bundle_dir)
    gone = rows(site.db, "SELECT id, stored_path FROM results LIMIT 1")[0]
    os.unlink(gone["stored_path"])
    r = run_agent("review", "--db", str(site.db), "--inbox", str(dirs["inbox"]), "--model", str(bundle_dir),
                  "--export", str(tmp_path / "out"), "--all")
    assert r.returncode == 0, r.stderr
    assert "8 thumbnails" in r.stdout
    assert "moved or pruned" in (tmp_path / "out" / "index.html").read_text()


def test_start_up_errors_are_sentences(dirs, tmp_path) -> None:
    r = run_agent("review", "--db", str(tmp_path / "none.db"), "--inbox", str(dirs["inbox"]))
    assert r.returncode == 2 and "no database at" in r.stderr and "Traceback" not in r.stderr
    r = run_agent("review", "--db", str(tmp_path / "none.db"))
    assert r.returncode == 2 and "needs the processed folder" in r.stderr
    foreign = tmp_path / "other.db"
    import sqlite3

    c = sqlite3.connect(foreign)
    c.execute("CREATE TABLE t (x)")
    c.commit()
    c.close()
    r = run_agent("review", "--db", str(foreign), "--inbox", str(dirs["inbox"]))
    assert r.returncode == 2 and "not an edge-agent results database" in r.stderr


def test_server_upgrades_an_old_database_and_refuses_a_busy_port(dirs, bundle_dir, tmp_path, procs) -> None:
    site = make_site(dirs, bundle_dir)
    import sqlite3

    c = sqlite3.connect(site.db)  # as the agent of schema 2 left it
    c.executescript("DROP VIEW results_reviewed; DROP VIEW latest_reviews; DROP TABLE reviews; "
                    "DELETE FROM schema_version WHERE version > 2; PRAGMA user_version = 2;")
    c.close()
    proc, url = start_review(dirs, bundle_dir, tmp_path / "a.log")
    procs.append(proc)
    assert rows(site.db, "SELECT count(*) FROM reviews")[0][0] == 0
    with urllib.request.urlopen(url + "case/1") as r:
        assert r.status == 200 and r.headers["Content-Security-Policy"]
    req = urllib.request.Request(url, headers={"Host": "attacker.example"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 421
    port = url.rsplit(":", 1)[1].strip("/")
    r = run_agent("review", "--db", str(site.db), "--inbox", str(dirs["inbox"]), "--port", port)
    assert r.returncode == 2 and "cannot listen on" in r.stderr and "another --port" in r.stderr
    proc.terminate()
    assert proc.wait(timeout=30) == 0
