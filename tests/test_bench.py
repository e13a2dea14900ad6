"""The benchmarks: their arithmetic, and a smoke run of both commands (no timing assertions)."""
from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner

from edge_agent import bench
from edge_agent.benchstats import latency_summary, percentile, ratio, table
from edge_agent.decode import read_header

nan = float("nan")


# --- arithmetic --------------------------------------------------------------------------

def test_percentile_matches_numpy_linear() -> None:
    rng = np.random.default_rng(1)
    values = list(rng.random(101))
    for q in (0, 1, 50, 95, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert math.isnan(percentile([], 50))


def test_latency_summary_counts_images_not_calls() -> None:
    s = latency_summary([0.1, 0.1, 0.2, 0.2], batch=8)
    assert s["images_per_s"] == pytest.approx(32 / 0.6)
    assert s["p50_ms"] == pytest.approx(150.0)
    assert s["iterations"] == 4 and s["batch"] == 8


def test_ratio_of_nothing_is_nan() -> None:
    assert ratio(10.0, 4.0) == 2.5
    assert math.isnan(ratio(1.0, 0.0))
    assert math.isnan(ratio(1.0, None))  # type: ignore[arg-type]


def test_steady_rate_skips_start_up_and_counts_between_commits() -> None:
    commits = [(8, 1.0), (40, 2.0), (72, 3.0), (104, 4.0)]
    assert bench.steady_rate(commits, skip=40) == pytest.approx((104 - 40) / 2.0)
    assert bench.steady_rate(commits, skip=0) == pytest.approx((104 - 8) / 3.0)
    # too few commits past `skip`: fall back to the first commit rather than report nothing
    assert bench.steady_rate(commits, skip=1000) == pytest.approx((104 - 8) / 3.0)
    assert bench.steady_rate(list(reversed(commits)), skip=40) == pytest.approx(32.0)
    assert math.isnan(bench.steady_rate([(8, 1.0)], skip=0))
    assert math.isnan(bench.steady_rate([], skip=0))


def test_bound_is_the_slower_of_decode_and_inference() -> None:
    assert bench.stage_bound({"hash": 5.0, "decode": 100.0, "infer": 60.0, "db": 1.0}) == ("infer", 60.0)
    assert bench.stage_bound({"decode": 20.0, "infer": 60.0}) == ("decode", 20.0)
    assert bench.stage_bound({"decode": nan, "infer": 60.0}) == ("infer", 60.0)
    stage, rate = bench.stage_bound({"hash": 1.0})
    assert stage is None and math.isnan(rate)


def test_cpu_bound_is_cores_over_cpu_seconds_per_image() -> None:
    assert bench.cpu_bound({"hash": 0.001, "decode": 0.004, "infer": 0.005}, cores=2) == pytest.approx(200.0)
    assert bench.cpu_bound({"decode": 0.01, "infer": nan}, cores=1) == pytest.approx(100.0)
    assert math.isnan(bench.cpu_bound({}, cores=2))


def test_summarize_fractions_and_ratio_to_naive() -> None:
    def alone(rate: float, cpu: float) -> dict[str, float]:
        return {"images_per_s": rate, "cpu_s_per_image": cpu, "ms_per_image": 1000 / rate}

    entry = {"stages": {"cores": 2, "alone": {"hash": alone(1000, 0.001), "decode": alone(200, 0.009),
                                              "infer": alone(100, 0.010), "db": alone(5000, 0.0)}},
             "scan": {"images_per_s": 90.0}, "naive": {"images_per_s": 15.0}}
    s = bench.summarize(entry)
    assert s["bound_stage"] == "infer" and s["bound_images_per_s"] == 100.0
    assert s["fraction_of_bound"] == pytest.approx(0.9)
    assert s["cpu_bound_images_per_s"] == pytest.approx(100.0)
    assert s["x_naive"] == pytest.approx(6.0)
    assert math.isnan(bench.summarize({"stages": entry["stages"], "scan": {"images_per_s": 90.0}})["x_naive"])


def test_per_image_ms() -> None:
    got = bench.per_image_ms({"decode": {"seconds": 0.5, "items": 100}, "db": {"seconds": 0.1, "items": 100}}, 100)
    assert got == {"decode": pytest.approx(5.0), "db": pytest.approx(1.0)}


def test_parse_sizes() -> None:
    assert bench.parse_sizes("source, 1024x768,4000X3000") == [None, (1024, 768), (4000, 3000)]
    for bad in ("", "1024", "axb", "16x16"):
        with pytest.raises(ValueError):
            bench.parse_sizes(bad)


def test_table_renders_missing_values_as_dash() -> None:
    text = table([{"a": "x", "b": nan}, {"a": "y", "b": 1.5}], [("a", "A", ""), ("b", "B", ".1f")])
    assert text.splitlines()[2].split() == ["x", "-"] and text.splitlines()[3].split() == ["y", "1.5"]


# --- test images --------------------------------------------------------------------------

def test_comment_copy_has_new_hash_same_pixels(example_images: list[Path]) -> None:
    data = example_images[0].read_bytes()
    copy = bench.add_comment(data, "copy 7")
    assert hashlib.sha256(copy).digest() != hashlib.sha256(data).digest()
    a = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    b = cv2.imdecode(np.frombuffer(copy, np.uint8), cv2.IMREAD_COLOR)
    assert np.array_equal(a, b)
    assert read_header(copy) == read_header(data)
    with pytest.raises(ValueError):
        bench.add_comment(b"\x89PNG....", "x")


def test_generated_images_are_distinct_sized_and_cached(example_images: list[Path], tmp_path: Path) -> None:
    files = bench.make_images(example_images[:3], (96, 72), 7, tmp_path / "set")
    assert len({hashlib.sha256(p.read_bytes()).hexdigest() for p in files}) == 7
    assert all(cv2.imread(str(p)).shape == (72, 96, 3) for p in files)
    mtimes = [p.stat().st_mtime_ns for p in files]
    assert bench.make_images(example_images[:3], (96, 72), 7, tmp_path / "set") == files
    assert [p.stat().st_mtime_ns for p in files] == mtimes  # reused, not regenerated
    same = bench.make_images(example_images[:3], None, 4, tmp_path / "src")
    assert same[0].read_bytes() == example_images[0].read_bytes()  # the real file, untouched
    assert same[3].read_bytes() != example_images[0].read_bytes()


# --- smoke runs of both commands ------------------------------------------------------------

def test_edge_agent_bench_smoke(bundle_dir: Path, tmp_path: Path) -> None:
    from edge_agent.cli import main

    examples = Path(__file__).resolve().parents[1] / "examples" / "images"
    res = CliRunner().invoke(main, ["bench", "--inbox", str(examples), "--model", str(bundle_dir), "--count", "6",
                                    "--sizes", "source,64x48", "--min-seconds", "0", "--skip", "0",
                                    "--workdir", str(tmp_path / "work"), "--workers", "1", "--threads", "1", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [e["size"] for e in out["sizes"]] == ["200x150", "64x48"]
    for e in out["sizes"]:
        assert e["scan"]["results"] == 6 and e["scan"]["exit_code"] == 0
        assert set(e["stages"]["alone"]) == {"hash", "decode", "infer", "db"}
        assert {"hash", "decode", "infer", "db"} <= set(e["scan"]["stage_ms"])
        assert e["naive"]["images_per_s"] > 0 and e["scan"]["peak_rss_mb"] > 0
        assert e["bound_stage"] in ("decode", "infer")
    text = bench.render(out)
    assert "200x150" in text and "of bound" in text and "naive loop" in text


def test_build_model_bench_smoke(bundle_dir: Path) -> None:
    from build_model.bench import render, run

    out = run(bundle_dir, iters=2, warmup=1, threads=1, batches=(1, 2), engines=("ort-fp32", "ort-int8"))
    rows = {(r["engine"], r["batch"]): r for r in out["rows"]}
    assert set(rows) == {("ort-fp32", 1), ("ort-int8", 1), ("ort-fp32", 2), ("ort-int8", 2)}
    assert rows[("ort-fp32", 2)]["x_vs_ort_fp32"] == 1.0
    assert all(r["iterations"] == 2 and r["peak_rss_mb"] > 0 for r in rows.values())
    assert "ort-int8" in render(out)


def test_both_benchmarks_run_an_unsigned_two_view_bundle_the_environment_allows(tmp_path: Path) -> None:
    """Every worker of `edge-agent bench`, the long scan's included, accepts what the environment trusts (here
    EDGE_AGENT_ALLOW_UNSIGNED_BUNDLE: an experiment's bundle), and both benchmarks feed a two-view bundle both
    squares of each image: `build-model bench` counts images, not model inputs."""
    from build_model.bench import run
    from edge_agent.cli import main
    from test_agent_views import _views_manifest

    from bundle_factory import make_bundle

    b = make_bundle(tmp_path / "views", sign=False, **_views_manifest())
    examples = Path(__file__).resolve().parents[1] / "examples" / "images"
    res = CliRunner(env={"EDGE_AGENT_ALLOW_UNSIGNED_BUNDLE": "true"}).invoke(
        main, ["bench", "--inbox", str(examples), "--model", str(b), "--count", "4", "--sizes", "64x48",
               "--long", "6", "--min-seconds", "0", "--skip", "0", "--workdir", str(tmp_path / "work"),
               "--workers", "1", "--threads", "1", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["sizes"][0]["scan"]["results"] == 4 and out["long"]["results"] == 6
    rows = run(b, iters=2, warmup=1, threads=1, batches=(2,), engines=("ort-int8",))["rows"]
    assert rows[0]["batch"] == 2 and rows[0]["images_per_s"] > 0
