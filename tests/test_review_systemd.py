"""systemd/edge-agent-review.service: a separate hardened unit, loopback only, read-only images; and the one
thing systemd cannot enforce (only the reviews table is written), enforced by the app's SQLite authorizer."""
from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from test_systemd import parse_unit

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "systemd" / "edge-agent-review.service"
AGENT_UNIT = ROOT / "systemd" / "edge-agent.service"
MAX_EXPOSURE = 1.5
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed (apt-get install systemd)")


@pytest.fixture(scope="module")
def unit() -> dict[str, list[str]]:
    return parse_unit(UNIT)["Service"]


def test_review_unit_is_loopback_only_and_images_read_only(unit) -> None:
    assert unit["ExecStart"][0].split()[1:4] == ["review", "--config", "/etc/edge-agent/config.toml"]
    assert "--host 127.0.0.1" in unit["ExecStart"][0]
    assert unit["IPAddressDeny"] == ["any"] and unit["IPAddressAllow"] == ["localhost"]
    ro = " ".join(unit["ReadOnlyPaths"]).split()
    assert "/var/lib/edge-agent/processed" in ro and "/var/lib/edge-agent/quarantine" in ro
    assert unit["ReadWritePaths"] == ["/var/lib/edge-agent"]  # the database's folder (SQLite -wal/-shm), no more
    assert any("inbox" in p for p in unit["InaccessiblePaths"])
    for k, v in (("ProtectSystem", "strict"), ("NoNewPrivileges", "yes"), ("PrivateDevices", "yes"),
                 ("MemoryDenyWriteExecute", "yes"), ("CapabilityBoundingSet", "")):
        assert unit[k] == [v], k
    # the screening unit keeps its promise: no network at all
    assert parse_unit(AGENT_UNIT)["Service"]["PrivateNetwork"] == ["yes"]


@needs_analyze
def test_review_unit_exposure_score() -> None:
    r = subprocess.run([ANALYZE, "security", "--offline=yes", "--no-pager", str(UNIT)], capture_output=True,
                       text=True, env={**os.environ, "SYSTEMD_COLORS": "0"})
    out = r.stdout + r.stderr
    m = re.search(r"Overall exposure level for edge-agent-review\.service:\s*([0-9.]+)", out)
    assert m, f"no exposure level (rc={r.returncode}):\n{out}"
    print(f"systemd-analyze security edge-agent-review.service: {m.group(1)}")
    assert float(m.group(1)) <= MAX_EXPOSURE, out


@needs_analyze
def test_review_unit_verifies_clean(tmp_path) -> None:
    d = tmp_path / "units"
    d.mkdir()
    text = UNIT.read_text().replace("ExecStart=/opt/edge-agent/venv/bin/edge-agent ", f"ExecStart={sys.executable} ")
    (d / "edge-agent-review.service").write_text(text)
    (d / "bad.service").write_text(text.replace("ProtectSystem=strict", "ProtectSystme=strict"))
    r = subprocess.run([ANALYZE, "verify", "--man=no", str(d / "edge-agent-review.service")], capture_output=True,
                       text=True, env={**os.environ, "SYSTEMD_COLORS": "0"})
    ours = [ln for ln in (r.stdout + r.stderr).splitlines() if "edge-agent-review" in ln]
    assert r.returncode == 0 and not ours, r.stdout + r.stderr
    bad = subprocess.run([ANALYZE, "verify", "--man=no", str(d / "bad.service")], capture_output=True, text=True)
    assert "ProtectSystme" in bad.stdout + bad.stderr  # verify really reads the files


def test_verdict_connection_can_only_insert_reviews(dirs, bundle_dir, example_images) -> None:
    from conftest import scan_now
    from edge_agent.review.db import ReviewWriter, ensure_schema

    (dirs["inbox"] / "a.jpg").write_bytes(example_images[0].read_bytes())
    scan_now(dirs, bundle_dir)
    ensure_schema(dirs["db"])
    conn = ReviewWriter(dirs["db"]).connect()
    try:
        for sql in ("UPDATE results SET label = 'mel'", "DELETE FROM results", "DROP TABLE results",
                    "INSERT INTO events (at, kind) VALUES ('x', 'y')", "CREATE TABLE t (x)",
                    "ATTACH DATABASE ':memory:' AS other", "PRAGMA journal_mode = DELETE",
                    "DELETE FROM reviews", "DROP TRIGGER reviews_no_update"):
            with pytest.raises(sqlite3.DatabaseError, match="not authorized"):
                conn.execute(sql)
        conn.execute("INSERT INTO reviews (result_id, result_sha256, reviewed_at, reviewer, agree, diagnosis, "
                     "action) VALUES (1, 'x', 'now', 'dr', 1, 'mel', 'none')")
        assert conn.execute("SELECT count(*) FROM reviews").fetchone()[0] == 1
    finally:
        conn.close()
