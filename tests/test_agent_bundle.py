"""Bundle verification: a tampered, incomplete or too-new bundle must never run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from bundle_factory import write_manifest
from conftest import settings_for
from edge_agent.bundle import FORMAT_VERSION, BundleError, load_bundle, verify_bundle
from edge_agent.cli import main


def _manifest(bundle: Path) -> dict:
    return json.loads((bundle / "manifest.json").read_text())


def test_valid_bundle_verifies_and_loads(bundle_dir: Path) -> None:
    rep = verify_bundle(bundle_dir)
    assert rep.ok, rep.errors
    assert set(rep.files) == {"model.int8.onnx", "model.fp32.onnx", "report.md", "split.csv"}
    assert set(rep.files.values()) == {"ok"}
    b = load_bundle(bundle_dir)
    assert b.labels == ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
    assert b.high_risk_labels == ("mel", "bcc", "akiec")
    assert b.primary == "int8" and b.fallback == "fp32" and b.input_size == 32
    assert b.model_id.endswith(rep.manifest["files"]["model.int8.onnx"][:8])


def test_tampered_model_is_refused(fresh_bundle: Path) -> None:
    p = fresh_bundle / "model.int8.onnx"
    data = bytearray(p.read_bytes())
    data[-10] ^= 0xFF
    p.write_bytes(bytes(data))
    rep = verify_bundle(fresh_bundle)
    assert not rep.ok and rep.files["model.int8.onnx"] == "mismatch"
    assert any("model.int8.onnx does not match its sha256" in e for e in rep.errors)
    with pytest.raises(BundleError, match="do not run this one"):
        load_bundle(fresh_bundle)


def test_tampered_report_is_refused_too(fresh_bundle: Path) -> None:
    (fresh_bundle / "report.md").write_text("# all metrics are great\n")
    assert not verify_bundle(fresh_bundle).ok


def test_unlisted_file_is_refused(fresh_bundle: Path) -> None:
    (fresh_bundle / "extra.onnx").write_bytes(b"\x08\x07")
    rep = verify_bundle(fresh_bundle)
    assert not rep.ok and rep.files["extra.onnx"] == "unlisted"
    assert any("not listed in the manifest" in e for e in rep.errors)


def test_missing_file_is_refused(fresh_bundle: Path) -> None:
    (fresh_bundle / "model.fp32.onnx").unlink()
    rep = verify_bundle(fresh_bundle)
    assert not rep.ok and rep.files["model.fp32.onnx"] == "missing"


def test_newer_format_version_is_refused(fresh_bundle: Path) -> None:
    write_manifest(fresh_bundle, _manifest(fresh_bundle), format_version=FORMAT_VERSION + 1)
    rep = verify_bundle(fresh_bundle)
    assert not rep.ok and "newer than this agent understands" in rep.errors[0] and "upgrade edge-agent" in rep.errors[0]


def test_unapproved_primary_is_refused(fresh_bundle: Path) -> None:
    m = _manifest(fresh_bundle)
    m["models"]["int8"]["approved"] = False
    write_manifest(fresh_bundle, m)
    assert any("not approved" in e for e in verify_bundle(fresh_bundle).errors)


def test_bad_labels_and_thresholds_are_refused(fresh_bundle: Path) -> None:
    m = _manifest(fresh_bundle)
    m["high_risk_labels"] = ["mel", "scc"]
    m["thresholds"]["melanoma"]["probability"] = 1.5
    write_manifest(fresh_bundle, m)
    errors = verify_bundle(fresh_bundle).errors
    assert any("scc" in e for e in errors) and any("thresholds.melanoma.probability" in e for e in errors)


def test_not_a_bundle(tmp_path: Path) -> None:
    rep = verify_bundle(tmp_path)
    assert not rep.ok and "manifest.json is missing" in rep.errors[0]
    assert "not a folder" in verify_bundle(tmp_path / "nope").errors[0]


def test_cli_model_verify_and_info(bundle_dir: Path, fresh_bundle: Path) -> None:
    runner = CliRunner()
    ok = runner.invoke(main, ["model", "verify", str(bundle_dir)])
    assert ok.exit_code == 0, ok.output
    assert "OK" in ok.output
    info = runner.invoke(main, ["model", "info", str(bundle_dir)])
    assert info.exit_code == 0 and "APPROVED" in info.output and "mel (Melanoma)" in info.output
    (fresh_bundle / "model.fp32.onnx").write_bytes(b"tampered")
    bad = runner.invoke(main, ["model", "verify", str(fresh_bundle)])
    assert bad.exit_code == 1 and "REJECTED" in bad.output
    as_json = runner.invoke(main, ["model", "verify", "--json", "--no-load", str(fresh_bundle)])
    assert json.loads(as_json.output)["ok"] is False


def test_model_verify_loads_each_variant(fresh_bundle: Path) -> None:
    """A checksummed but unloadable INT8 is a warning when FP32 can take over."""
    (fresh_bundle / "model.int8.onnx").write_bytes(b"not an onnx model")
    write_manifest(fresh_bundle, _manifest(fresh_bundle))
    res = CliRunner().invoke(main, ["model", "verify", str(fresh_bundle)])
    assert res.exit_code == 0, res.output
    assert "does not run in onnxruntime" in res.output and "fall back to fp32" in res.output


def test_agent_refuses_to_start_on_a_tampered_bundle(dirs: dict[str, Path], fresh_bundle: Path,
                                                     example_images: list[Path]) -> None:
    import shutil

    from edge_agent.pipeline import Agent

    shutil.copy(example_images[0], dirs["inbox"])
    (fresh_bundle / "model.int8.onnx").write_bytes(b"swapped")
    with pytest.raises(BundleError):
        Agent(settings_for(dirs, fresh_bundle), one_shot=True).scan()
    assert (dirs["inbox"] / example_images[0].name).exists()  # nothing happened to the image
    res = CliRunner().invoke(main, ["scan", "--inbox", str(dirs["inbox"]), "--db", str(dirs["db"]),
                                    "--model", str(fresh_bundle)])
    assert res.exit_code == 2 and "refusing to use the model bundle" in res.output
