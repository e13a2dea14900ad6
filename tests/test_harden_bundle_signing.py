"""Issue 16 item 3: bundles are tamper-evident end to end.

Before: manifest.json was in no checksum, so raising every threshold to 0.99 or
swapping the mel and nv labels passed `edge-agent model verify` and ran under
the same model_id. Now the manifest carries an Ed25519 signature (manifest.sig)
checked against the keys the device trusts, every result row carries the
manifest's SHA-256 and the threshold policy in force, and an unsigned bundle or
a threshold override is announced at every start (WARNING + events row).

Real keys (generated here), real bundles (bundle_factory), real `edge-agent`
subprocesses, real SQLite files.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from bundle_factory import TEST_PUBLIC_KEY, make_bundle, sign_bundle
from conftest import rows, run_agent, variant_jpegs
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from faults import agent_env, site_args

from edge_agent.bundle import BundleError, default_bundle_path, load_bundle, verify_bundle
from edge_agent.signing import SIG_FILE, key_id, make_trust, project_key_path, sign_manifest, write_keypair

TEST_TRUST = make_trust([TEST_PUBLIC_KEY])


def _edit_manifest_bytes(bundle: Path, fn) -> None:
    """Change manifest.json the way an attacker with write access would: parse, modify, write back, leaving
    manifest.sig (and every model file) as it was."""
    m = json.loads((bundle / "manifest.json").read_text())
    fn(m)
    (bundle / "manifest.json").write_text(json.dumps(m, indent=2))


def _raise_thresholds(m: dict) -> None:
    for spec in m["thresholds"].values():
        if "probability" in spec:
            spec["probability"] = 0.99


def _swap_mel_nv(m: dict) -> None:
    labels = m["labels"]
    i, j = labels.index("mel"), labels.index("nv")
    labels[i], labels[j] = labels[j], labels[i]


def _other_model(m: dict, bundle: Path) -> None:
    """Replace the INT8 model and fix its checksum in the manifest: the file check passes, the signature must not."""
    from bundle_factory import tiny_classifier

    data = tiny_classifier(seed=7)
    (bundle / "model.int8.onnx").write_bytes(data)
    m["files"]["model.int8.onnx"] = hashlib.sha256(data).hexdigest()


def _scan(dirs: dict[str, Path], bundle: Path, *extra: str, env: dict[str, str] | None = None):
    return run_agent("scan", *site_args(dirs, bundle, *extra), env=env)


def _images(dirs: dict[str, Path], example_images: list[Path], n: int = 3) -> None:
    variant_jpegs(example_images, dirs["inbox"], n)


# --- the shipped bundle ---------------------------------------------------------------------

def test_shipped_bundle_is_signed_by_the_project_key_and_verifies_without_extra_trust() -> None:
    rep = verify_bundle(default_bundle_path(), make_trust())
    assert rep.ok, rep.errors
    assert rep.signature is not None and rep.signature.valid
    assert rep.signature.trusted_by == f"project key {project_key_path()}"
    assert rep.manifest_sha256 == hashlib.sha256((default_bundle_path() / "manifest.json").read_bytes()).hexdigest()
    # the CLI with nothing configured (only the project key) says the same
    r = run_agent("model", "verify", "--no-load", env=agent_env(EDGE_AGENT_TRUSTED_KEYS=""))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "signature: valid" in r.stdout and key_id(make_trust().keys[0].key) in r.stdout


def test_project_private_key_is_not_in_the_repository() -> None:
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(["git", "-C", str(root), "grep", "-lE", "^-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----"],
                         capture_output=True, text=True)
    assert out.stdout.strip() == "", f"a private key is committed: {out.stdout}"


# --- tampering ----------------------------------------------------------------------------

@pytest.mark.parametrize("tamper", ["thresholds", "labels", "model"])
def test_tampered_manifest_is_refused_by_verify_info_and_scan(tamper: str, fresh_bundle: Path, dirs: dict[str, Path],
                                                              example_images: list[Path]) -> None:
    assert verify_bundle(fresh_bundle).ok
    fn = {"thresholds": _raise_thresholds, "labels": _swap_mel_nv,
          "model": lambda m: _other_model(m, fresh_bundle)}[tamper]
    _edit_manifest_bytes(fresh_bundle, fn)

    rep = verify_bundle(fresh_bundle, TEST_TRUST)
    assert not rep.ok
    assert any("modified after it was signed" in e for e in rep.errors), rep.errors
    assert all(state == "ok" for state in rep.files.values()), "the files match the (tampered) manifest"
    with pytest.raises(BundleError, match="modified after it was signed"):
        load_bundle(fresh_bundle, TEST_TRUST)

    r = run_agent("model", "verify", "--no-load", str(fresh_bundle))
    assert r.returncode == 1 and "REJECTED" in r.stdout and "modified after it was signed" in r.stdout
    r = run_agent("model", "info", str(fresh_bundle))
    assert r.returncode == 1 and "modified after it was signed" in r.stderr and "Traceback" not in r.stderr

    _images(dirs, example_images)
    # allow_unsigned_bundle does not accept a signature that no longer matches: that is tampering, not "unsigned"
    for extra in ((), ("--allow-unsigned-bundle",)):
        r = _scan(dirs, fresh_bundle, *extra)
        assert r.returncode == 2, r.stderr
        assert "refusing to use the model bundle" in r.stderr and "modified after it was signed" in r.stderr
        assert "Traceback" not in r.stderr
    assert len(list(dirs["inbox"].iterdir())) == 3, "nothing may be screened with a tampered bundle"


def test_signature_of_another_manifest_does_not_transfer(fresh_bundle: Path, tmp_path: Path) -> None:
    """A valid manifest.sig from another (genuine) bundle signed by the same trusted key is still refused."""
    other = make_bundle(tmp_path / "other", seed=3)
    shutil.copyfile(other / SIG_FILE, fresh_bundle / SIG_FILE)
    rep = verify_bundle(fresh_bundle, TEST_TRUST)
    assert not rep.ok and rep.signature is not None and rep.signature.status == "invalid"


# --- keys and trust --------------------------------------------------------------------------

def test_bundle_signed_by_an_untrusted_key_is_refused_until_the_site_trusts_it(
        fresh_bundle: Path, dirs: dict[str, Path], example_images: list[Path], tmp_path: Path) -> None:
    kid = write_keypair(tmp_path / "keys" / "site.key", tmp_path / "keys" / "site.pub")
    assert stat.S_IMODE(os.stat(tmp_path / "keys" / "site.key").st_mode) == 0o600
    from edge_agent.signing import load_private_key

    sign_bundle(fresh_bundle, load_private_key(tmp_path / "keys" / "site.key"))
    rep = verify_bundle(fresh_bundle, TEST_TRUST)
    assert not rep.ok and rep.signature.status == "untrusted"
    assert any(kid in e and "does not trust" in e and "trusted_keys" in e for e in rep.errors), rep.errors

    _images(dirs, example_images)
    r = _scan(dirs, fresh_bundle)
    assert r.returncode == 2 and kid in r.stderr and "does not trust" in r.stderr
    # the site's key, configured by the administrator in the config file
    cfg = tmp_path / "agent.toml"
    cfg.write_text(f'trusted_keys = ["{tmp_path / "keys" / "site.pub"}"]\n')
    r = _scan(dirs, fresh_bundle, "--config", str(cfg), env=agent_env(EDGE_AGENT_TRUSTED_KEYS=""))
    assert r.returncode == 0, r.stderr
    assert len(rows(dirs["db"], "SELECT id FROM results")) == 3
    # ... or in the environment, or with a flag, for `model verify` as for `scan`
    env = agent_env(EDGE_AGENT_TRUSTED_KEYS=str(tmp_path / "keys" / "site.pub"))
    assert run_agent("model", "verify", "--no-load", str(fresh_bundle), env=env).returncode == 0
    r = run_agent("model", "verify", "--no-load", str(fresh_bundle), "--trusted-key", str(tmp_path / "keys" / "site.pub"),
                  env=agent_env(EDGE_AGENT_TRUSTED_KEYS=""))
    assert r.returncode == 0 and f"signed by {kid}" in r.stdout


def test_unusable_trusted_key_file_is_a_clear_start_error(fresh_bundle: Path, dirs: dict[str, Path],
                                                          tmp_path: Path) -> None:
    missing = tmp_path / "nope.pub"
    r = _scan(dirs, fresh_bundle, "--trusted-key", str(missing))
    assert r.returncode == 2 and str(missing) in r.stderr and "does not exist" in r.stderr and "Traceback" not in r.stderr
    private = tmp_path / "k.key"
    write_keypair(private, tmp_path / "k.pub")
    r = _scan(dirs, fresh_bundle, "--trusted-key", str(private))
    assert r.returncode == 2 and "PRIVATE key" in r.stderr and "Traceback" not in r.stderr
    garbage = tmp_path / "garbage.pub"
    garbage.write_bytes(os.urandom(100))
    r = _scan(dirs, fresh_bundle, "--trusted-key", str(garbage))
    assert r.returncode == 2 and "not a PEM public key" in r.stderr


def test_missing_signature_is_refused_with_instructions(tmp_path: Path, dirs: dict[str, Path],
                                                        example_images: list[Path]) -> None:
    bundle = make_bundle(tmp_path / "unsigned", sign=False)
    rep = verify_bundle(bundle, TEST_TRUST)
    assert not rep.ok and rep.signature.status == "missing"
    assert any("build-model sign" in e and "allow_unsigned_bundle" in e for e in rep.errors), rep.errors
    _images(dirs, example_images)
    r = _scan(dirs, bundle)
    assert r.returncode == 2 and "not signed" in r.stderr


def test_allowed_unsigned_bundle_runs_with_a_warning_and_an_event_at_every_start(
        tmp_path: Path, dirs: dict[str, Path], example_images: list[Path]) -> None:
    bundle = make_bundle(tmp_path / "unsigned", sign=False)
    cfg = tmp_path / "agent.toml"
    cfg.write_text("allow_unsigned_bundle = true\n")
    _images(dirs, example_images, 2)
    r = _scan(dirs, bundle, "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    assert "WARNING" in r.stderr and "WITHOUT a trusted signature" in r.stderr
    _images(dirs, example_images, 1)
    r = run_agent("scan", *site_args(dirs, bundle), env=agent_env(EDGE_AGENT_ALLOW_UNSIGNED_BUNDLE="1"))
    assert r.returncode == 0 and "WITHOUT a trusted signature" in r.stderr
    events = rows(dirs["db"], "SELECT detail FROM events WHERE kind = 'unsigned_bundle'")
    assert len(events) == 2 and all("allow_unsigned_bundle = true" in e["detail"] for e in events)
    digest = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    assert {r["manifest_sha256"] for r in rows(dirs["db"], "SELECT manifest_sha256 FROM results")} == {digest}


def test_damaged_or_hostile_signature_files_are_refused_without_hanging(fresh_bundle: Path, tmp_path: Path) -> None:
    sig = fresh_bundle / SIG_FILE
    good = sig.read_bytes()
    cases = {
        "garbage": lambda: sig.write_bytes(b"\x00\xff not json"),
        "wrong format": lambda: sig.write_text(json.dumps({"format": "x"})),
        "bad base64": lambda: sig.write_text(json.dumps({**json.loads(good), "signature": "!!!"})),
        "short key": lambda: sig.write_text(json.dumps({**json.loads(good), "public_key": "AAAA"})),
        "huge": lambda: sig.write_bytes(b" " * (1 << 20)),
        "fifo": lambda: os.mkfifo(sig),
        "symlink": lambda: sig.symlink_to(tmp_path / "elsewhere.sig"),
        "folder": lambda: sig.mkdir(),
    }
    (tmp_path / "elsewhere.sig").write_bytes(good)
    for name, make in cases.items():
        if sig.is_dir() and not sig.is_symlink():
            sig.rmdir()
        else:
            sig.unlink(missing_ok=True)
        make()
        rep = verify_bundle(fresh_bundle, make_trust([TEST_PUBLIC_KEY], allow_unsigned=True))
        assert not rep.ok, name
        assert rep.signature is not None and rep.signature.status == "invalid", name


# --- provenance in the results -----------------------------------------------------------------

def test_every_result_row_carries_the_manifest_hash_and_the_policy(fresh_bundle: Path, dirs: dict[str, Path],
                                                                    example_images: list[Path]) -> None:
    _images(dirs, example_images, 4)
    r = _scan(dirs, fresh_bundle)
    assert r.returncode == 0, r.stderr
    digest = hashlib.sha256((fresh_bundle / "manifest.json").read_bytes()).hexdigest()
    got = rows(dirs["db"], "SELECT manifest_sha256, policy, json_extract(policy, '$.thresholds.melanoma') AS mel "
                           "FROM results")
    assert len(got) == 4
    assert {g["manifest_sha256"] for g in got} == {digest}
    assert {g["mel"] for g in got} == {0.3}
    policy = json.loads(got[0]["policy"])
    assert policy == {"thresholds": {"melanoma": 0.3, "malignant": 0.5, "low_confidence": 0.5}, "overridden": [],
                      "loosened": []}
    assert "WARNING" not in r.stderr
    ev = rows(dirs["db"], "SELECT detail FROM events WHERE kind = 'policy'")
    assert len(ev) == 1 and json.loads(ev[0]["detail"])["manifest_sha256"] == digest
    assert not rows(dirs["db"], "SELECT id FROM events WHERE kind IN ('threshold_override', 'unsigned_bundle')")
    out = run_agent("results", "--db", str(dirs["db"]), "--format", "json")
    listed = json.loads(out.stdout)
    assert [x["manifest_sha256"] for x in listed] == [digest] * 4 and listed[0]["policy"] == policy
    info = run_agent("model", "info", str(fresh_bundle))
    assert f"sha256 {digest}" in info.stdout, "model info shows the hash the rows carry"


def test_threshold_override_is_warned_logged_as_event_and_recorded_per_result(
        fresh_bundle: Path, dirs: dict[str, Path], example_images: list[Path]) -> None:
    _images(dirs, example_images, 2)
    r = _scan(dirs, fresh_bundle, "--threshold", "melanoma=0.1")
    assert r.returncode == 0, r.stderr
    assert "WARNING" in r.stderr and "melanoma 0.3 -> 0.1 (stricter)" in r.stderr
    _images(dirs, example_images[2:], 2)
    r = _scan(dirs, fresh_bundle, "--threshold", "low_confidence=0.2", "--threshold-override")
    assert r.returncode == 0, r.stderr
    assert "low_confidence 0.5 -> 0.2 (LESS STRICT, threshold_override)" in r.stderr
    ev = [e["detail"] for e in rows(dirs["db"], "SELECT detail FROM events WHERE kind = 'threshold_override' ORDER BY id")]
    assert len(ev) == 2 and "melanoma 0.3 -> 0.1" in ev[0] and "LESS STRICT" in ev[1]
    policies = [json.loads(x["policy"]) for x in rows(dirs["db"], "SELECT policy FROM results ORDER BY id")]
    assert len(policies) == 4
    assert all(p["thresholds"]["melanoma"] == 0.1 and p["overridden"] == ["melanoma"] and p["loosened"] == []
               for p in policies[:2])
    assert all(p["thresholds"]["low_confidence"] == 0.2 and p["loosened"] == ["low_confidence"] for p in policies[2:])


def test_version_1_database_gains_the_provenance_columns(tmp_path: Path) -> None:
    """A database written before the migration: old rows keep NULL (unknown), new rows get the values."""
    import sqlite_utils

    from edge_agent.store import _migration_1, connect, migrate

    db = tmp_path / "v1.db"
    conn = connect(db)
    _migration_1(sqlite_utils.Database(conn))
    conn.execute("PRAGMA user_version = 1")
    conn.execute("INSERT INTO results (sha256, original_name, original_path, file_state, received_at, processed_at, "
                 "model_id, model_variant, label, confidence, probabilities) VALUES ('a', 'x.jpg', '/x.jpg', "
                 "'moved', 't', 't', 'm', 'int8', 'nv', 0.9, '{}')")
    conn.commit()
    migrate(conn, ["nv"])
    cols = {r[1] for r in conn.execute("PRAGMA table_info(results)")}
    assert {"manifest_sha256", "policy"} <= cols
    assert tuple(conn.execute("SELECT manifest_sha256, policy FROM results").fetchone()) == (None, None)
    assert conn.execute("PRAGMA user_version").fetchone()[0] >= 2
    conn.close()


# --- build-model keygen / sign ---------------------------------------------------------------

def _build_model(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "build_model", *args], capture_output=True, text=True, timeout=120)


def test_build_model_keygen_and_sign_round_trip(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", sign=False)
    key = tmp_path / "keys" / "site.key"
    r = _build_model("keygen", "--private", str(key))
    assert r.returncode == 0, r.stderr
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600 and (tmp_path / "keys" / "site.pub").exists()
    r = _build_model("keygen", "--private", str(key))
    assert r.returncode != 0 and "refusing to overwrite" in r.stderr

    # signing vouches for the manifest: a bundle whose files do not match it is not signed
    with open(bundle / "model.fp32.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xfe")
    r = _build_model("sign", "--bundle", str(bundle), "--key", str(key))
    assert r.returncode != 0 and "refusing to sign" in r.stderr and not (bundle / SIG_FILE).exists()

    bundle = make_bundle(tmp_path / "b2", sign=False)
    r = _build_model("sign", "--bundle", str(bundle), "--key", str(key))
    assert r.returncode == 0, r.stderr
    assert verify_bundle(bundle, make_trust([tmp_path / "keys" / "site.pub"])).ok
    assert not verify_bundle(bundle, TEST_TRUST).ok
    r = _build_model("verify", str(bundle), "--require-signature")
    assert r.returncode != 0 and "does not trust" in r.stderr
    r = _build_model("verify", str(bundle), "--require-signature", "--trusted-key", str(tmp_path / "keys" / "site.pub"))
    assert r.returncode == 0 and "signed by" in r.stdout


def test_signature_is_over_the_exact_bytes(fresh_bundle: Path) -> None:
    """Reformatting the manifest (same JSON value, other bytes) breaks the signature: nothing is canonicalised,
    so what is verified is exactly what is parsed."""
    m = json.loads((fresh_bundle / "manifest.json").read_text())
    (fresh_bundle / "manifest.json").write_text(json.dumps(m))
    assert not verify_bundle(fresh_bundle, TEST_TRUST).ok
    import edge_agent.bundle

    assert edge_agent.bundle.SIG_FILE == SIG_FILE  # bundle.py names it without importing cryptography
    key = Ed25519PrivateKey.generate()
    doc = json.loads(sign_manifest(b"{}", key))
    assert doc["key_id"] == key_id(key.public_key()) and doc["algorithm"] == "ed25519"


def test_trust_settings_parse_from_every_source(tmp_path: Path) -> None:
    from edge_agent.config import ConfigError, load_settings

    cfg = tmp_path / "a.toml"
    cfg.write_text('trusted_keys = ["~/a.pub", "/b.pub"]\nallow_unsigned_bundle = true\n')
    s = load_settings(environ={}, config_file=cfg)
    assert s.trusted_keys == (Path("~/a.pub").expanduser(), Path("/b.pub")) and s.allow_unsigned_bundle is True
    s = load_settings(environ={"EDGE_AGENT_TRUSTED_KEYS": "/c.pub,/d.pub", "EDGE_AGENT_ALLOW_UNSIGNED_BUNDLE": "no"},
                      config_file=cfg)
    assert s.trusted_keys == (Path("/c.pub"), Path("/d.pub")) and s.allow_unsigned_bundle is False
    s = load_settings({"trusted_keys": (Path("/e.pub"),)}, environ={"EDGE_AGENT_TRUSTED_KEYS": "/c.pub"})
    assert s.trusted_keys == (Path("/e.pub"),)
    for bad in ("trusted_keys = 5", "trusted_keys = [1]", "allow_unsigned_bundle = \"maybe\""):
        cfg.write_text(bad + "\n")
        with pytest.raises(ConfigError, match="trusted_keys|allow_unsigned_bundle"):
            load_settings(environ={}, config_file=cfg)
