"""Monitoring (issue 14, item 4): the Prometheus textfile a real daemon writes, parsed with prometheus_client's
own parser; `status --format json` carrying the same figures; the agent without prometheus_client."""
from __future__ import annotations

import json
import sqlite3
import textwrap
from pathlib import Path

import pytest
from conftest import EXAMPLES, rows, run_agent, variant_jpegs
from faults import AgentProc, agent_env, site_args, wait_for

parser = pytest.importorskip("prometheus_client.parser")


def families(path: Path) -> dict[str, object]:
    text = path.read_text()
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


def value(fams: dict, name: str, sample: str | None = None, **labels: str) -> float:
    fam = fams[name]
    for s in fam.samples:
        if (sample is None or s.name == sample) and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError((name, sample, labels))


def screened(path: Path) -> float:
    try:
        return value(families(path), "edge_agent_images_screened")
    except (FileNotFoundError, KeyError):
        return -1


def test_metrics_textfile_from_a_running_daemon(tmp_path: Path, dirs: dict[str, Path], bundle_dir: Path,
                                                procs: list) -> None:
    variant_jpegs(sorted(EXAMPLES.glob("*.jpg")), dirs["inbox"], 6)
    (dirs["inbox"] / "junk.jpg").write_bytes(b"not an image" * 20)
    (dirs["inbox"] / "dup.jpg").write_bytes((dirs["inbox"] / "img_000.jpg").read_bytes())
    prom = tmp_path / "textfile" / "edge_agent.prom"
    prom.parent.mkdir()
    a = AgentProc("run", site_args(dirs, bundle_dir, "--quiet-seconds", "0", "--partial-timeout-seconds", "0.01",
                                   "--metrics-file", str(prom), "--metrics-seconds", "1"), tmp_path / "a.log",
                  registry=procs)
    wait_for(lambda: screened(prom) == 6 and value(families(prom), "edge_agent_backlog") == 0, timeout=60,
             what="all screened in the metrics file", proc=a)
    fams = families(prom)
    assert fams["edge_agent_images_screened"].type == "counter"
    assert value(fams, "edge_agent_duplicates") == 1
    assert value(fams, "edge_agent_images_quarantined", reason="not_image") == 1
    flagged = {s.labels["reason"]: s.value for s in fams["edge_agent_images_flagged"].samples}
    assert set(flagged) >= {"high_risk", "low_confidence", "poor_quality", "model_disagreement"}
    db_flags = rows(dirs["db"], "SELECT review_reasons FROM results")
    for reason in flagged:
        assert flagged[reason] == sum(reason in (r[0] or "").split(",") for r in db_flags)
    assert value(fams, "edge_agent_images_flagged_any") == rows(
        dirs["db"], "SELECT count(*) FROM results WHERE needs_review = 1")[0][0]
    assert value(fams, "edge_agent_fallback_results") == 0
    hist = fams["edge_agent_inference_latency_seconds"]
    assert hist.type == "histogram"
    assert value(fams, "edge_agent_inference_latency_seconds", "edge_agent_inference_latency_seconds_count") == 6
    assert value(fams, "edge_agent_last_result_timestamp_seconds") > 0
    assert value(fams, "edge_agent_disk_free_bytes", folder="database") > 0
    assert value(fams, "edge_agent_paused") == 0
    assert value(fams, "edge_agent_up") == 1 and value(fams, "edge_agent_ready") == 1
    model_id = rows(dirs["db"], "SELECT model_id FROM results LIMIT 1")[0][0]
    info = fams["edge_agent_model_info"].samples[0].labels
    assert info["model_id"] == model_id and info["variant"] == "int8" and info["temperature"] == "1.5"
    assert oct(prom.stat().st_mode & 0o777) == "0o644"  # node_exporter runs as another user
    assert [p.name for p in prom.parent.iterdir()] == ["edge_agent.prom"]  # no temporary files left

    # status --format json carries the same figures (posted with the agent's state)
    def status() -> dict:
        r = run_agent("status", "--db", str(dirs["db"]), "--format", "json")
        return json.loads(r.stdout)

    st = wait_for(lambda: (s := status()).get("metrics") and s["metrics"].get("edge_agent_images_screened_total") == 6
                  and s, what="metrics in status", proc=a)
    m = st["metrics"]
    assert m["edge_agent_duplicates_total"] == 1
    assert m['edge_agent_images_quarantined_total{reason="not_image"}'] == 1
    assert m["edge_agent_inference_latency_seconds_count"] == 6
    assert m["edge_agent_up"] == 1
    text = run_agent("status", "--db", str(dirs["db"])).stdout
    assert "metrics:         6 screened" in text

    a.term()
    assert a.wait(60) == 0
    fams = families(prom)
    assert value(fams, "edge_agent_up") == 0 and value(fams, "edge_agent_ready") == 0  # left at a clean stop


def test_without_prometheus_client_the_agent_screens_and_says_how_to_enable(tmp_path: Path, dirs: dict[str, Path],
                                                                            bundle_dir: Path, procs: list) -> None:
    block = tmp_path / "block"
    block.mkdir()
    # a real import failure, as on an install without the [metrics] extra
    (block / "prometheus_client.py").write_text("raise ImportError('No module named prometheus_client')\n")
    (block / "sitecustomize.py").write_text("")
    variant_jpegs(sorted(EXAMPLES.glob("*.jpg")), dirs["inbox"], 2)
    prom = tmp_path / "edge_agent.prom"
    env = agent_env(PYTHONPATH=str(block))
    a = AgentProc("run", site_args(dirs, bundle_dir, "--quiet-seconds", "0", "--metrics-file", str(prom)),
                  tmp_path / "a.log", env=env, registry=procs)

    def done() -> bool:
        try:
            return rows(dirs["db"], "SELECT count(*) FROM results")[0][0] == 2
        except sqlite3.OperationalError:
            return False

    wait_for(done, what="screening without metrics", proc=a)
    a.term()
    assert a.wait(60) == 0
    log = a.log()
    assert log.count("metrics are off") == 1 and "pip install 'edge-derm-screen[metrics]'" in log
    assert not prom.exists()


def test_alert_rules_in_the_docs_name_real_metrics() -> None:
    """docs/operations.md's alert rules only use metric names the agent writes."""
    import re

    from edge_agent.metrics import Metrics

    doc = (Path(__file__).resolve().parents[1] / "docs" / "operations.md").read_text()
    rules = doc.split("```yaml", 1)[1].split("```", 1)[0]
    used = set(re.findall(r"\bedge_agent_[a-z_]+", rules))
    m = Metrics(None)
    known = {s.name for fam in m.registry.collect() for s in fam.samples} | {f.name for f in m.registry.collect()}
    assert used and used <= known, used - known
    for alert in ("EdgeAgentStoppedWithBacklog", "EdgeAgentFallbackRate", "EdgeAgentDiskPause"):
        assert f"alert: {alert}" in rules
    sample = (Path(__file__).resolve().parents[1] / "docs" / "metrics-sample.prom").read_text()
    assert {f.name for f in parser.text_string_to_metric_families(sample)} >= {"edge_agent_images_screened",
                                                                               "edge_agent_up", "edge_agent_model_info"}
    textwrap.dedent(rules)


def test_fallback_figures_when_the_int8_model_does_not_load(tmp_path: Path, dirs: dict[str, Path], procs: list) -> None:
    """The figure behind the fallback-rate alert: every result from the FP32 fallback is counted, the switch too."""
    from bundle_factory import make_bundle

    bundle = make_bundle(tmp_path / "fb", int8_bytes=b"not an onnx model")
    variant_jpegs(sorted(EXAMPLES.glob("*.jpg")), dirs["inbox"], 3)
    prom = tmp_path / "edge_agent.prom"
    a = AgentProc("run", site_args(dirs, bundle, "--quiet-seconds", "0", "--metrics-file", str(prom),
                                   "--metrics-seconds", "1"), tmp_path / "a.log", registry=procs)
    wait_for(lambda: screened(prom) == 3, what="screened with the fallback", proc=a)
    fams = families(prom)
    assert value(fams, "edge_agent_fallback_results") == 3
    assert value(fams, "edge_agent_fallback_events") == 1
    info = fams["edge_agent_model_info"].samples[0].labels
    assert info["variant"] == "fp32" and info["fallback_active"] == "1"
    a.term()
    assert a.wait(60) == 0
