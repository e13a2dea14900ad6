"""Issue 16 item 9 (parts): settings without upper bounds, unknown EDGE_AGENT_* variables, SIGHUP, and file
names with newlines or control characters in log lines."""
from __future__ import annotations

import io
import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from faults import (AgentProc, agent_env, assert_exactly_once, distinct_images, outcome_count, outcome_rows,
                    site_args, wait_for, write_images)


def test_every_numeric_setting_has_an_upper_bound(tmp_path) -> None:
    from edge_agent.config import BOUNDS, FIELDS, ConfigError, load_settings

    numeric = {n for n, f in FIELDS.items() if str(f.type) in ("int", "float")}
    assert numeric == set(BOUNDS), f"settings without bounds: {sorted(numeric - set(BOUNDS))}"
    base = {"inbox": tmp_path / "in", "db": tmp_path / "r.db"}
    for name, (lo, hi, _) in BOUNDS.items():
        too_big = int(hi * 10 + 1) if str(FIELDS[name].type) == "int" else hi * 10 + 1
        with pytest.raises(ConfigError, match=f"{name}=.*(out of range|must)"):
            load_settings({**base, name: too_big}, environ={})
    # the reported case: 1e13 MiB made every image an internal_error; now a clear refusal naming the range
    with pytest.raises(ConfigError, match=r"max_file_mb=1[0-9.e+]+ is out of range: it must be between 0 and 2_048"):
        load_settings(base, environ={"EDGE_AGENT_MAX_FILE_MB": "1e13"})


def test_unknown_edge_agent_variable_is_refused_naming_the_valid_ones(dirs, bundle_dir) -> None:
    from edge_agent.config import ConfigError, load_settings

    with pytest.raises(ConfigError, match="EDGE_AGENT_BATCHSIZE.*EDGE_AGENT_BATCH_SIZE"):
        load_settings({}, environ={"EDGE_AGENT_BATCHSIZE": "8"})
    r = subprocess.run([sys.executable, "-m", "edge_agent", "scan", *site_args(dirs, bundle_dir)],
                       env=agent_env(EDGE_AGENT_QUIET_SECOND="1"), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "EDGE_AGENT_QUIET_SECOND" in r.stderr and "EDGE_AGENT_QUIET_SECONDS" in r.stderr
    load_settings({}, environ={"EDGE_AGENT_CONFIG": "", "EDGE_AGENT_CRASH_AT": ""})  # ours, not settings


def test_sighup_reloads_and_restarts_only_for_settings_that_need_it(procs, dirs, bundle_dir, tmp_path) -> None:
    """SIGHUP (`systemctl reload`) reloads in place (issue 14: the model; tests/test_ops_model_swap.py); a changed
    setting that only applies at start makes the daemon stop gracefully with exit 4, which the unit restarts."""
    shas = write_images(dirs["inbox"], distinct_images(4, seed=201))
    cfg = tmp_path / "config.toml"
    body = f'inbox = "{dirs["inbox"]}"\ndb = "{dirs["db"]}"\nmodel = "{bundle_dir}"\nworkers = 2\nthreads = 1\n'
    cfg.write_text(body + "quiet_seconds = 0.2\n")
    a = AgentProc("run", ["--config", str(cfg)], tmp_path / "a.log", registry=procs)
    wait_for(lambda: outcome_count(dirs["db"]) == 4, what="the files", proc=a)
    a._signal(signal.SIGHUP)
    wait_for(lambda: "is already the running model" in a.log(), what="reload without change", proc=a)
    assert a.alive()
    cfg.write_text(body + "quiet_seconds = 0.5\n")
    a._signal(signal.SIGHUP)
    assert a.wait(60) == 4, a.log()[-3000:]  # 4: stopped to restart (killed by the signal would be -1)
    assert "SIGHUP received" in a.log() and "settings changed (quiet_seconds)" in a.log() and "stopped:" in a.log()
    assert_exactly_once(dirs, shas)
    unit = (Path(__file__).resolve().parents[1] / "systemd" / "edge-agent.service").read_text()
    assert "RestartForceExitStatus=4" in unit and "SuccessExitStatus=4" in unit  # systemd starts it again
    assert "ExecReload=/bin/kill -HUP $MAINPID" in unit


def test_scan_stops_cleanly_on_sighup_and_sigint(dirs, bundle_dir, tmp_path) -> None:
    """A terminal closed (SIGHUP) or Ctrl-C (SIGINT) during `scan`: the images in flight are finished and
    recorded, the rest stay in the inbox; no traceback, no kill mid-commit."""
    from faults import inbox_files

    for sig, n in ((signal.SIGHUP, 0), (signal.SIGINT, 1)):
        shas = write_images(dirs["inbox"], distinct_images(60, seed=203 + n), prefix=f"s{n}")
        marker = tmp_path / f"paused{n}"
        a = AgentProc("scan", site_args(dirs, bundle_dir, "--workers", "1"), tmp_path / f"scan{n}.log",
                      harness=["--pause-after-read", f"s{n}_0010.jpg", str(marker)])
        wait_for(marker.exists, what="the scan to be in the middle of the inbox", proc=a)
        a._signal(sig)
        marker.unlink()
        code = a.wait(120)
        assert code == 1, (sig, code, a.log()[-3000:])  # 1: files left without an outcome, by request
        assert "Traceback" not in a.log()
        left = {p.name for p in inbox_files(dirs["inbox"])}
        recorded = {r["original_name"] for r in outcome_rows(dirs["db"])}
        assert not (left & recorded) and left | recorded >= set(shas)
        for p in inbox_files(dirs["inbox"]):
            p.unlink()


def test_control_characters_in_names_are_escaped_in_log_lines() -> None:
    from edge_agent import log as logsetup

    stream = io.StringIO()
    logsetup.setup("INFO", stream)
    try:
        lg = logging.getLogger("edge_agent.pipeline")
        evil = "x.jpg\n2026-01-01 00:00:00 ERROR forged: line\r\x1b[2J\udcff"
        lg.warning("quarantined %s (%s): %s", evil, "bad", OSError(f"no {evil}"))
        lg.info(f"f-string {evil}")
    finally:
        logging.getLogger("edge_agent").handlers.clear()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert all("\x1b" not in ln and "\r" not in ln and "\udcff" not in ln for ln in lines)
    assert "x.jpg\\n2026-01-01 00:00:00 ERROR forged: line\\r\\x1b[2J\\xff" in lines[0]
    assert "\\x1b[2J\\xff" in lines[1]


def test_a_file_named_with_a_newline_gives_one_log_line(dirs, bundle_dir) -> None:
    name = "evil\n<0>forged: everything is fine.jpg"
    good = "red\x1b[31m\nline.jpg"
    (dirs["inbox"] / name).write_bytes(b"not an image at all")
    (dirs["inbox"] / good).write_bytes(distinct_images(1, seed=202)[0])
    r = subprocess.run([sys.executable, "-m", "edge_agent", "scan", *site_args(dirs, bundle_dir)],
                       env=agent_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(row["original_name"] for row in outcome_rows(dirs["db"])) == sorted([name, good])
    assert not [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("<0>")]
    assert "evil\\n<0>forged" in r.stderr and "evil\\n<0>forged" in r.stdout
    shown = subprocess.run([sys.executable, "-m", "edge_agent", "results", "--db", str(dirs["db"])],
                           env=agent_env(), capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0 and "red\\x1b[31m\\nline.jpg" in shown.stdout and "\x1b" not in shown.stdout
