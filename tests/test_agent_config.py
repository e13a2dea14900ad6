"""Settings precedence (flags > environment > TOML > defaults) and validation messages."""
from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.config import ConfigError, Settings, load_settings


def toml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_defaults(tmp_path: Path) -> None:
    s = load_settings({"inbox": tmp_path / "in", "db": tmp_path / "r.db"}, environ={})
    assert s.after == "move" and s.providers == ("CPUExecutionProvider",) and s.batch_size == 4
    assert s.processed_path == tmp_path / "processed" and s.quarantine_path == tmp_path / "quarantine"
    assert s.model_path.name == "bundle" and s.model_path.parent.name == "edge_agent"


def test_precedence_flags_env_file_defaults(tmp_path: Path) -> None:
    cfg = toml(tmp_path, 'inbox = "/srv/in"\nbatch_size = 4\nquiet_seconds = 5\nafter = "keep"\n'
                         'providers = ["CPUExecutionProvider"]\n[thresholds]\nmelanoma = 0.2\n')
    env = {"EDGE_AGENT_BATCH_SIZE": "16", "EDGE_AGENT_QUIET_SECONDS": "7.5", "EDGE_AGENT_CONFIG": str(cfg)}
    s = load_settings({"batch_size": 2}, environ=env)
    assert s.batch_size == 2            # flag beats env
    assert s.quiet_seconds == 7.5       # env beats file
    assert s.after == "keep"            # file beats default
    assert s.inbox == Path("/srv/in")
    assert s.thresholds == {"melanoma": 0.2}
    assert s.rescan_seconds == Settings().rescan_seconds


def test_edge_agent_table_and_env_lists(tmp_path: Path) -> None:
    cfg = toml(tmp_path, '[edge_agent]\ndb = "/var/lib/edge-agent/results.db"\n')
    env = {"EDGE_AGENT_PROVIDERS": "CUDAExecutionProvider, CPUExecutionProvider",
           "EDGE_AGENT_THRESHOLDS": "melanoma=0.2,malignant=0.4", "EDGE_AGENT_THRESHOLD_OVERRIDE": "yes"}
    s = load_settings({}, environ=env, config_file=cfg)
    assert s.db == Path("/var/lib/edge-agent/results.db")
    assert s.providers == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert s.thresholds == {"melanoma": 0.2, "malignant": 0.4} and s.threshold_override is True


@pytest.mark.parametrize("env, message", [
    ({"EDGE_AGENT_BATCH_SIZE": "lots"}, r"batch_size \(from environment EDGE_AGENT_BATCH_SIZE\).*whole number"),
    ({"EDGE_AGENT_BATCH_SIZE": "0"}, "batch_size=0 must be at least 1"),
    ({"EDGE_AGENT_AFTER": "shred"}, "after='shred' is not one of move, delete, keep"),
    ({"EDGE_AGENT_SPOT_CHECK_FRACTION": "1.5"}, "spot_check_fraction=1.5 must be between 0 and 1"),
    ({"EDGE_AGENT_THRESHOLDS": "melanoma"}, "NAME=PROBABILITY"),
    ({"EDGE_AGENT_THRESHOLDS": "melanoma=2"}, "between 0 and 1"),
    ({"EDGE_AGENT_THRESHOLD_OVERRIDE": "perhaps"}, "true or false"),
    ({"EDGE_AGENT_LOG_LEVEL": "chatty"}, "log_level"),
])
def test_invalid_values_say_what_and_where(env: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings({}, environ=env)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown setting 'batchsize'.*known settings"):
        load_settings({}, environ={}, config_file=toml(tmp_path, "batchsize = 3\n"))


def test_broken_or_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot be read as TOML"):
        load_settings({}, environ={}, config_file=toml(tmp_path, "batch_size = = 3\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings({}, environ={}, config_file=tmp_path / "missing.toml")


def test_output_folders_must_be_outside_the_inbox(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="outside the inbox"):
        load_settings({"inbox": tmp_path / "in", "processed_dir": tmp_path / "in"}, environ={})
    with pytest.raises(ConfigError, match="outside the inbox"):
        load_settings({"inbox": tmp_path / "in" / "sub", "quarantine_dir": tmp_path / "in"}, environ={})
    # inside the inbox is refused too (issue 16 item 5): its files would be screened again at every rescan
    with pytest.raises(ConfigError, match="inside the inbox"):
        load_settings({"inbox": tmp_path / "in", "processed_dir": tmp_path / "in" / "done"}, environ={})
