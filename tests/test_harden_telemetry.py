"""Issue 16 item 8: ONNX Runtime's telemetry stays off, and its own warnings stay out of the log.

onnxruntime 1.32's official builds create ~/.cache/Microsoft/DeveloperTools/
.onnxruntime/ (a persistent device id and an event database with the OS, the
Python path, model file names and execution providers) on the first import.
Every command that loads onnxruntime runs here with a fresh HOME; the control
test shows that the same check catches the files when the agent's setting is
missing, so the other tests can fail.
"""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from bundle_factory import make_bundle, tiny_classifier
from conftest import agent_cmd
from faults import AgentProc, agent_env, distinct_images, outcome_count, wait_for, write_images

ORT_TELEMETRY = Path(".cache") / "Microsoft" / "DeveloperTools" / ".onnxruntime"


def fresh_env(home: Path, **extra: str) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in agent_env(**extra).items() if k not in ("ORT_DISABLE_TELEMETRY", "XDG_CACHE_HOME")}
    env["HOME"] = str(home)
    return env


def telemetry_files(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for p in home.rglob("*") if "Microsoft" in p.parts or
                  "onnxruntime" in p.name.lower())


def test_control_plain_onnxruntime_writes_telemetry_into_a_fresh_home(tmp_path) -> None:
    """Without the agent's setting, importing onnxruntime creates the telemetry files: the check below sees
    them. (If a future onnxruntime stops doing this, the other tests still pass, but prove less.)"""
    home = tmp_path / "home"
    r = subprocess.run([sys.executable, "-c", "import onnxruntime"], env=fresh_env(home), capture_output=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    files = telemetry_files(home)
    if not files:
        pytest.skip("this onnxruntime build writes no telemetry files at all")
    assert any(str(ORT_TELEMETRY) in f for f in files), files


def test_an_inherited_setting_cannot_turn_telemetry_back_on(tmp_path) -> None:
    home = tmp_path / "home"
    code = "import edge_agent.infer, os; print(os.environ['ORT_DISABLE_TELEMETRY'])"
    r = subprocess.run([sys.executable, "-c", code], env=fresh_env(home, ORT_DISABLE_TELEMETRY="0"),
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "1", r.stderr
    assert telemetry_files(home) == []


def test_scan_run_and_model_verify_leave_no_telemetry(dirs, bundle_dir, tmp_path) -> None:
    home = tmp_path / "home"
    env = fresh_env(home)
    write_images(dirs["inbox"], distinct_images(3, seed=181))
    args = ["--inbox", str(dirs["inbox"]), "--db", str(dirs["db"]), "--model", str(bundle_dir), "--workers", "1"]
    r = subprocess.run(agent_cmd("scan", *args), env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert outcome_count(dirs["db"]) == 3
    assert telemetry_files(home) == [], "after scan"

    write_images(dirs["inbox"], distinct_images(2, seed=182), prefix="later")
    a = AgentProc("run", args, tmp_path / "run.log", env=env)
    try:
        wait_for(lambda: outcome_count(dirs["db"]) == 5, what="run to screen the new images", proc=a)
        a.p.send_signal(signal.SIGTERM)
        assert a.wait(60) == 0, a.log()[-2000:]
    finally:
        if a.alive():
            a.kill()
    assert telemetry_files(home) == [], "after run"

    r = subprocess.run(agent_cmd("model", "verify", str(bundle_dir)), env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert telemetry_files(home) == [], "after model verify"
    assert not (home / ".cache").exists()


def model_with_unused_initializer() -> bytes:
    """The test classifier plus an initializer no node uses: onnxruntime's graph cleaner logs
    "Removing initializer ..." at WARNING on every load, as it did for the shipped FP32 model."""
    m = onnx.load_from_string(tiny_classifier(0))
    m.graph.initializer.append(numpy_helper.from_array(np.ones(4, np.float32), "left_over_reshape"))
    return m.SerializeToString()


def test_onnxruntime_warnings_stay_out_of_the_log(dirs, tmp_path) -> None:
    bundle = make_bundle(tmp_path / "bundle", int8_bytes=model_with_unused_initializer())
    plain = subprocess.run([sys.executable, "-c", "import onnxruntime as o, sys; "
                            "o.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])",
                            str(bundle / "model.int8.onnx")], env=fresh_env(tmp_path / "h1"),
                           capture_output=True, text=True, timeout=120)
    assert "Removing initializer" in plain.stderr, "control: the model does provoke the warning"
    write_images(dirs["inbox"], distinct_images(2, seed=183))
    env = fresh_env(tmp_path / "h2")
    r = subprocess.run(agent_cmd("scan", "--inbox", str(dirs["inbox"]), "--db", str(dirs["db"]), "--model",
                                 str(bundle), "--workers", "1", "--log-level", "DEBUG"),
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert outcome_count(dirs["db"]) == 2
    assert "Removing initializer" not in r.stderr + r.stdout
    assert ":onnxruntime:" not in r.stderr, r.stderr  # onnxruntime's own log line format
    v = subprocess.run(agent_cmd("model", "verify", str(bundle)), env=env, capture_output=True, text=True,
                       timeout=300)
    assert "Removing initializer" not in v.stderr + v.stdout


def test_any_session_in_an_agent_process_is_quiet(tmp_path) -> None:
    """The default logger is at ERROR once edge_agent.infer is imported, so even a session opened with
    default options (the benchmark's naive baseline, any future code path) logs no optimizer warnings."""
    path = tmp_path / "unused.onnx"
    path.write_bytes(model_with_unused_initializer())
    code = ("import sys, edge_agent.infer, onnxruntime as o; "
            "o.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider']); print('loaded')")
    r = subprocess.run([sys.executable, "-c", code, str(path)], env=fresh_env(tmp_path / "home"),
                       capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "loaded", r.stderr
    assert "Removing initializer" not in r.stderr, r.stderr
    assert telemetry_files(tmp_path / "home") == []
