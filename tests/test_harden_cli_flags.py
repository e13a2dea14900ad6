"""Flags, config keys, defaults and output formats line up (issue 17, the administrator).

Before: the config key `providers` was the flag `--provider` (and `thresholds`/`--threshold`,
`trusted_keys`/`--trusted-key`), although config.example.toml says keys are the flags with
underscores; `--help` showed no defaults for the agent's settings; `status` and `model` took
`--json` while `results` took `--format`.

Now every setting's flag is its key with dashes (the singular spellings still work), `--help` shows
each setting's default as Settings has it, and `--format json` works on every command that prints
JSON, with `--json` kept as an alias. Checked programmatically over every setting, through real CLI
subprocesses.
"""
from __future__ import annotations

import json
import re
from dataclasses import MISSING
from pathlib import Path

import pytest

from bundle_factory import TEST_PUBLIC_KEY
from conftest import REPO, rows, run_agent

from edge_agent.config import FIELDS, Settings

EXAMPLE = REPO / "systemd" / "config.example.toml"


def flag(key: str) -> str:
    return "--" + key.replace("_", "-")


@pytest.fixture(scope="module")
def run_help() -> str:
    r = run_agent("run", "--help")
    assert r.returncode == 0, r.stderr
    return re.sub(r"\s+", " ", r.stdout)  # help wraps lines: compare with whitespace collapsed


def test_every_setting_has_its_key_as_flag_in_run_and_scan() -> None:
    from edge_agent.cli import run, scan

    for cmd in (run, scan):
        opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
        missing = [flag(k) for k in FIELDS if flag(k) not in opts]
        assert not missing, f"{cmd.name}: settings without a flag named after the key: {missing}"
        # the old singular spellings keep working
        assert {"--provider", "--threshold", "--trusted-key"} <= opts


def test_example_config_keys_are_the_flags(run_help: str) -> None:
    """config.example.toml: 'Keys are the command-line options with underscores' - for every key it shows."""
    text = EXAMPLE.read_text()
    keys = set(re.findall(r"^#?\s?([a-z_]+)\s*=", text, re.MULTILINE))
    assert {"inbox", "db", "model", "trusted_keys", "threads"} <= keys
    assert keys <= set(FIELDS), keys - set(FIELDS)
    for k in keys:
        assert f" {flag(k)}" in run_help, f"{k} in {EXAMPLE.name} has no flag {flag(k)} in `run --help`"


def test_help_shows_every_default(run_help: str) -> None:
    from edge_agent.config import default_text

    s = Settings()
    for k, f in FIELDS.items():
        text = default_text(k)
        if text is None:
            assert getattr(s, k) in (None, ()), k  # only settings without a default go without one
            continue
        assert f"[default: {text}]" in run_help, f"{flag(k)}: no [default: {text}] in `run --help`"
        v = getattr(s, k)
        if f.default is not MISSING and isinstance(v, (int, float)) and not isinstance(v, bool):
            assert float(text) == v, k  # the number shown is the one the agent uses


def test_plural_flags_and_singular_aliases_work(dirs, bundle_dir: Path, example_images) -> None:
    base = ["--inbox", str(dirs["inbox"]), "--db", str(dirs["db"]), "--model", str(bundle_dir), "--workers", "1",
            "--threads", "1"]
    (dirs["inbox"] / "a.jpg").write_bytes(example_images[0].read_bytes())
    r = run_agent("scan", *base, "--providers", "CPUExecutionProvider", "--thresholds", "melanoma=0.01",
                  "--trusted-keys", str(TEST_PUBLIC_KEY))
    assert r.returncode == 0, r.stdout + r.stderr
    policy = json.loads(rows(dirs["db"], "SELECT policy FROM results")[0]["policy"])
    assert "0.01" in json.dumps(policy), policy  # --thresholds really reached the agent
    r = run_agent("scan", *base, "--provider", "NoSuchExecutionProvider", "--threshold", "melanoma=0.01",
                  "--trusted-key", str(TEST_PUBLIC_KEY))
    assert r.returncode == 2 and "NoSuchExecutionProvider" in r.stderr, r.stdout + r.stderr


def test_format_json_everywhere_and_json_alias(dirs, bundle_dir: Path, example_images) -> None:
    (dirs["inbox"] / "a.jpg").write_bytes(example_images[0].read_bytes())
    assert run_agent("scan", "--inbox", str(dirs["inbox"]), "--db", str(dirs["db"]), "--model", str(bundle_dir),
                     "--trusted-keys", str(TEST_PUBLIC_KEY), "--workers", "1", "--threads", "1").returncode == 0
    trust = ["--trusted-keys", str(TEST_PUBLIC_KEY)]
    for args in (["status", "--db", str(dirs["db"])], ["model", "info", str(bundle_dir), *trust],
                 ["model", "verify", "--no-load", str(bundle_dir), *trust]):
        fmt = run_agent(*args, "--format", "json")
        alias = run_agent(*args, "--json")
        assert fmt.returncode == 0 and alias.returncode == 0, fmt.stdout + fmt.stderr + alias.stderr
        a, b = json.loads(fmt.stdout), json.loads(alias.stdout)
        assert isinstance(a, dict) and a.keys() == b.keys(), args
        text = run_agent(*args, "--format", "text")
        with pytest.raises(json.JSONDecodeError):
            json.loads(text.stdout)
    for cmd in (["bench"], ["results"]):
        assert "--format" in run_agent(*cmd, "--help").stdout


def test_bench_shows_the_agent_defaults_it_overrides() -> None:
    from edge_agent.config import default_text

    text = re.sub(r"\s+", " ", run_agent("bench", "--help").stdout)
    for k in ("threads", "workers", "batch_size", "queue_max"):
        assert f"{flag(k)} " in text and f"[default: {default_text(k)}]" in text, k
