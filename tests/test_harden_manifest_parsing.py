"""Issue 16 item 9 (manifest part): a hostile or damaged manifest.json is a clear refusal, never a traceback.

Before: a deeply nested manifest.json raised RecursionError out of json.loads
(a traceback from `model verify`, `model info`, `scan`); a manifest of the
wrong shape crashed `model info` or the load (label_names as a list, fallback
as a list, high_risk_labels of numbers), a FIFO named manifest.json blocked
verification for ever, a huge one was read whole, and "approved": "no" counted
as approved. Every case below runs through verify_bundle (in-process) and the
real CLI (subprocess or CliRunner), and must give an error that says what is
wrong, never an exception.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from bundle_factory import default_manifest, sign_bundle, write_manifest
from click.testing import CliRunner
from conftest import run_agent

from edge_agent.bundle import MAX_JSON_DEPTH, MAX_MANIFEST_BYTES, BundleError, load_bundle, verify_bundle
from edge_agent.cli import main


def _write_raw(bundle: Path, text: str | bytes) -> None:
    """A manifest as raw bytes, signed with the trusted test key: the parser must cope on its own, whoever
    signed it (a trusted key is not a promise that the file is well formed)."""
    data = text.encode() if isinstance(text, str) else text
    (bundle / "manifest.json").write_bytes(data)
    sign_bundle(bundle)


def _refused_everywhere(bundle: Path, expect: str) -> None:
    rep = verify_bundle(bundle)
    assert not rep.ok
    assert any(expect in e for e in rep.errors), rep.errors
    with pytest.raises(BundleError):
        load_bundle(bundle)
    for cmd in (["model", "verify", "--no-load", str(bundle)], ["model", "info", str(bundle)],
                ["model", "info", "--json", str(bundle)]):
        r = CliRunner().invoke(main, cmd)
        assert r.exit_code == 1, (cmd, r.output, r.exception)
        assert r.exception is None or isinstance(r.exception, SystemExit), (cmd, repr(r.exception))


def test_deeply_nested_manifest_is_refused_without_recursion_error(fresh_bundle: Path) -> None:
    _write_raw(fresh_bundle, "[" * 200_000 + "]" * 200_000)
    _refused_everywhere(fresh_bundle, "levels deep")
    # inside an otherwise valid manifest, too
    m = json.dumps(default_manifest())
    _write_raw(fresh_bundle, m[:-1] + ', "training2": ' + "{\"a\":" * 5000 + "1" + "}" * 5000 + "}")
    _refused_everywhere(fresh_bundle, "levels deep")
    r = run_agent("model", "verify", "--no-load", str(fresh_bundle))
    assert r.returncode == 1 and "Traceback" not in r.stderr + r.stdout and "levels deep" in r.stdout


def test_nesting_at_the_limit_is_fine_and_brackets_inside_strings_do_not_count(fresh_bundle: Path) -> None:
    deep: Any = 1
    for _ in range(MAX_JSON_DEPTH - 2):  # + the manifest object + the training object = the limit exactly
        deep = {"x": deep}
    m = default_manifest()
    m["training"] = {"note": "[\"{" * 10_000, "deep": deep}
    write_manifest(fresh_bundle, m)
    rep = verify_bundle(fresh_bundle)
    assert rep.ok, rep.errors
    m["training"]["deep"] = [deep]  # one level more
    write_manifest(fresh_bundle, m)
    assert any("levels deep" in e for e in verify_bundle(fresh_bundle).errors)


def test_huge_manifest_is_refused_before_it_is_read(fresh_bundle: Path) -> None:
    m = default_manifest()
    m["training"] = {"padding": "x" * (MAX_MANIFEST_BYTES + 10)}
    write_manifest(fresh_bundle, m)
    _refused_everywhere(fresh_bundle, "bytes")


def test_manifest_that_is_a_fifo_does_not_block(fresh_bundle: Path) -> None:
    (fresh_bundle / "manifest.json").unlink()
    os.mkfifo(fresh_bundle / "manifest.json")
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.setdefault("rep", verify_bundle(fresh_bundle)), daemon=True)
    t.start()
    t.join(30)  # bounds a hang only; a regression blocks in open()/read() for ever
    assert not t.is_alive(), "verify_bundle blocked on a FIFO named manifest.json"
    assert not out["rep"].ok and any("not a regular file" in e for e in out["rep"].errors)


def test_manifest_symlink_is_refused(fresh_bundle: Path, tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.json"
    (fresh_bundle / "manifest.json").rename(real)
    (fresh_bundle / "manifest.json").symlink_to(real)
    _refused_everywhere(fresh_bundle, "symlink")


@pytest.mark.parametrize("text,expect", [
    ("[]", "must hold a JSON object"),
    ('"manifest"', "must hold a JSON object"),
    ("42", "must hold a JSON object"),
    ("null", "must hold a JSON object"),
    ("", "not a valid manifest"),
    ('{"format_version": 1, "format_version": 1}', "appears twice"),
    ('{"format_version": 1, "temperature": NaN}', "NaN"),
    ('{"format_version": 1, "temperature": Infinity}', "Infinity"),
    ('{"format_version": ' + "9" * 5000 + "}", "not a valid manifest"),
    (b"\xff\xfe{}", "not UTF-8"),
])
def test_manifest_that_is_not_a_plain_json_object_is_refused(fresh_bundle: Path, text: str | bytes, expect: str) -> None:
    _write_raw(fresh_bundle, text)
    _refused_everywhere(fresh_bundle, expect)


BAD_VALUES: list[Any] = [None, [], {}, "x", 1, 1.5, True, [[1]], [{"a": 1}], {"a": [1]}, -1, 10**12]


@pytest.mark.parametrize("key", sorted(default_manifest()))
def test_every_top_level_field_with_every_wrong_type_is_a_clear_refusal(fresh_bundle: Path, key: str) -> None:
    """Each manifest field replaced by each kind of wrong value: verification lists the problem (or accepts a
    harmless value), and nothing - verify, load, `model info`, `model verify` - raises."""
    for value in BAD_VALUES:
        m = default_manifest()
        m[key] = value
        write_manifest(fresh_bundle, m)
        rep = verify_bundle(fresh_bundle)  # must not raise
        if rep.ok:
            load_bundle(fresh_bundle)  # accepted: it really loads
        else:
            with pytest.raises(BundleError):
                load_bundle(fresh_bundle)
        for cmd in (["model", "info", str(fresh_bundle)], ["model", "verify", "--no-load", str(fresh_bundle)]):
            r = CliRunner().invoke(main, cmd)
            assert r.exception is None or isinstance(r.exception, SystemExit), (key, value, cmd, repr(r.exception))
            assert r.exit_code == (0 if rep.ok else 1), (key, value, r.output)


@pytest.mark.parametrize("path,value,expect", [
    (("models", "int8", "approved"), "no", "approved"),
    (("models", "int8", "approved"), 1, "approved"),
    (("models", "int8", "file"), ["model.int8.onnx"], "models.int8"),
    (("models", "int8"), "model.int8.onnx", "models.int8"),
    (("fallback",), ["fp32"], "fallback"),
    (("fallback",), {"fp32": 1}, "fallback"),
    (("label_names",), ["melanoma"], "label_names"),
    (("label_names", "mel"), ["melanoma"], "label_names"),
    (("high_risk_labels",), [1, [2]], "high_risk_labels"),
    (("labels",), ["akiec", "bcc", "bkl", "df", "mel", "nv", ["vasc"]], "labels"),
    (("model_id",), "id\nINJECTED log line", "model_id"),
    (("model_id",), "x" * 500, "model_id"),
    (("preprocessing", "input_size"), 32.5, "input_size"),
    (("preprocessing", "input_size"), 10**9, "input_size"),
    (("preprocessing", "input_size"), "32", "input_size"),
    (("preprocessing", "mean"), [1, 2], "mean"),
    (("preprocessing", "std"), [0, 1, 1], "std"),
    (("preprocessing", "interpolation"), "lanczos9", "interpolation"),
    (("preprocessing", "shades_of_gray_p"), "six", "shades_of_gray_p"),
    (("input", "shape"), ["batch", 3, 32.0, 32.0], "input.shape"),
    (("thresholds", "melanoma", "probability"), "0.3", "probability"),
    (("thresholds", "melanoma", "labels"), [["mel"]], "labels"),
    (("thresholds", "low_confidence"), 0.5, "low_confidence"),
    (("thresholds", "bad name\n"), {"labels": ["mel"], "probability": 0.5}, "threshold name"),
    (("gate",), "approved", "gate"),
    (("temperature",), "1.5", "temperature"),
])
def test_nested_fields_with_wrong_types_are_refused(fresh_bundle: Path, path: tuple[str, ...], value: Any,
                                                    expect: str) -> None:
    m = default_manifest()
    target = m
    for k in path[:-1]:
        target = target[k]
    target[path[-1]] = value
    write_manifest(fresh_bundle, m)
    _refused_everywhere(fresh_bundle, expect)
