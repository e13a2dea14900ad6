"""Settings: command-line flags > EDGE_AGENT_* environment > TOML file > defaults.

Everything is validated once, at start, with messages that name the setting,
where its value came from, and what would be accepted: a screening daemon
that starts with a typo and silently uses a default is worse than one that
refuses to start.
"""
from __future__ import annotations

import math
import os
import stat
import sys
from collections.abc import Mapping
from dataclasses import MISSING as _MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

ENV_PREFIX = "EDGE_AGENT_"
AFTER_CHOICES = ("move", "delete", "keep")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(ValueError):
    """A setting is missing or invalid; the message says which, where from, and what is allowed."""


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class Settings:
    """All agent settings with their defaults; HELP below says what each is for."""

    inbox: Path | None = None
    db: Path | None = None
    model: Path | None = None
    processed_dir: Path | None = None
    quarantine_dir: Path | None = None
    after: str = "move"
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    threads: int = field(default_factory=lambda: max(1, min(4, _cpus())))
    workers: int = field(default_factory=lambda: max(1, min(4, _cpus())))
    batch_size: int = 4  # measured: same throughput as 8 on 2 cores, keeps a 1,000-image scan under 200 MB RSS
    spot_check_fraction: float = 0.02
    thresholds: dict[str, float] = field(default_factory=dict)
    threshold_override: bool = False
    quiet_seconds: float = 2.0
    rescan_seconds: float = 30.0
    partial_timeout_seconds: float = 600.0
    max_pixels: int = 64_000_000
    max_file_mb: float = 100.0
    decode_cpu_seconds: float = 60.0
    min_sharpness: float = 10.0
    min_brightness: float = 40.0
    max_brightness: float = 225.0
    max_clipped_fraction: float = 0.25
    min_free_mb: float = 256.0
    log_level: str = "INFO"
    queue_max: int = 32
    # Bundle trust (signing.py, docs/install.md "Trusting model bundles"): public keys besides the project's
    # whose signatures this device accepts, and whether a bundle without a trusted signature may run.
    trusted_keys: tuple[Path, ...] = ()
    allow_unsigned_bundle: bool = False
    # Who may read results and screened images besides the agent's user (share.py, docs/install.md "Staff
    # access"): a group name or number; empty keeps them private to the agent's user.
    share_group: str = ""
    # Months unattended (docs/operations.md): retention (retention.py) and the Prometheus textfile (metrics.py).
    keep_processed_days: float = 0.0
    keep_quarantine_days: float = 0.0
    prune_free_mb: float = 0.0
    prune_seconds: float = 3600.0
    metrics_file: Path | None = None
    metrics_seconds: float = 15.0
    # Site calibration file (site_calibration.py, `edge-agent calibrate`): temperature and thresholds re-fitted
    # on this site's labelled cases; None: the file beside the bundle (BUNDLE.site-calibration.json) if present.
    calibration: Path | None = None

    @property
    def inbox_dir(self) -> Path:
        if self.inbox is None:
            raise ConfigError("no inbox set: pass --inbox DIR, set EDGE_AGENT_INBOX or `inbox` in the config file")
        return self.inbox

    @property
    def db_path(self) -> Path:
        if self.db is None:
            raise ConfigError("no database set: pass --db FILE, set EDGE_AGENT_DB or `db` in the config file")
        return self.db

    @property
    def processed_path(self) -> Path:
        return self.processed_dir or self.inbox_dir.parent / "processed"

    @property
    def quarantine_path(self) -> Path:
        return self.quarantine_dir or self.inbox_dir.parent / "quarantine"

    @property
    def model_path(self) -> Path:
        from .bundle import default_bundle_path
        return self.model or default_bundle_path()


FIELDS = {f.name: f for f in fields(Settings)}
HELP: dict[str, str] = {
    "inbox": "folder watched for new images",
    "db": "SQLite results database (created 0600, or 0640 with share_group)",
    "model": "model bundle folder",
    "processed_dir": "where screened images go",
    "quarantine_dir": "where unusable files go (created 0700)",
    "after": "what to do with an inbox file once its outcome is committed",
    "providers": "onnxruntime execution providers, in order of preference",
    "threads": "onnxruntime intra-op threads",
    "workers": "threads that hash, decode and preprocess images",
    "batch_size": "largest inference batch",
    "spot_check_fraction": "fraction of images also run on the FP32 model to catch INT8 drift (0 disables)",
    "thresholds": "per-rule threshold overrides; may only be stricter than the bundle's unless threshold_override",
    "threshold_override": "allow thresholds less strict than the bundle's (needs a clinician's approval)",
    "quiet_seconds": "a file without close/rename events counts as complete after this long without changes",
    "rescan_seconds": "full inbox rescan interval, catches missed events (network shares, inotify overflow)",
    "partial_timeout_seconds": "a temp-named (.part/.tmp/~), empty or truncated file is quarantined once unchanged "
                               "this long (run and scan alike: scan leaves younger ones in the inbox and names them)",
    "max_pixels": "largest accepted image (width x height), read from the header before decoding",
    "max_file_mb": "largest accepted file size in MiB",
    "decode_cpu_seconds": "processor time one image's decode may use before it is stopped and the file quarantined "
                          "(decode_timeout); a 64 MP image needs a few seconds, even on a Raspberry Pi",
    "min_sharpness": "variance of Laplacian (at <=256 px) below which an image is flagged blurry",
    "min_brightness": "mean brightness (0-255, image centre) below which an image is flagged too dark",
    "max_brightness": "mean brightness above which an image is flagged overexposed",
    "max_clipped_fraction": "fraction of pure black or pure white centre pixels above which exposure is poor",
    "min_free_mb": "pause intake while the database or output disk has less free space than this",
    "log_level": "log level",
    "queue_max": "most images in flight between intake and the database (backpressure)",
    "trusted_keys": "public key files (.pub, PEM Ed25519) whose bundle signatures this device accepts, besides the "
                    "project's key shipped with the package",
    "share_group": "group whose members may read the results database and the screened images (database 0640, "
                   "processed folders 0750, stored copies 0640, all with this group); empty: the agent's user only",
    "keep_processed_days": "remove stored screened images (and duplicates) older than this many days; the rows stay, "
                           "marked pruned (0: keep for ever)",
    "keep_quarantine_days": "remove quarantined files older than this many days; the rows stay (0: keep for ever)",
    "prune_free_mb": "disk watermark: while the processed folder's disk has less free space than this, remove the "
                     "oldest stored screened images (0: off; set it above min_free_mb)",
    "prune_seconds": "how often the daemon applies the retention settings",
    "metrics_file": "Prometheus textfile for node_exporter's textfile collector, rewritten atomically (needs the "
                    "[metrics] extra; empty: off)",
    "metrics_seconds": "how often the metrics file is rewritten",
    "calibration": "site calibration file written by `edge-agent calibrate` (verified at start: refused if made for "
                   "another model id or edited); its temperature and thresholds replace the bundle's",
    "allow_unsigned_bundle": "run a bundle whose manifest has no signature from a trusted key (logs a WARNING and "
                             "an event at every start)",
}


# How `--help` shows a default that is computed (or that a flag cannot show as a plain value).
_DEFAULT_TEXT: dict[str, str] = {
    "threads": "min(4, CPUs)",
    "workers": "min(4, CPUs)",
    "thresholds": "the bundle's",
    "providers": "CPUExecutionProvider",
    "model": "the bundle shipped with the package",
    "processed_dir": "INBOX/../processed",
    "quarantine_dir": "INBOX/../quarantine",
    "trusted_keys": "only the project's key",
    "calibration": "the file beside the bundle folder, if present",
}


def default_text(name: str) -> str | None:
    """The default of setting `name` as `--help` shows it (None: no default, e.g. inbox and db must be given).

    Read from Settings itself, so help can never drift from what the agent really uses."""
    if name in _DEFAULT_TEXT:
        return _DEFAULT_TEXT[name]
    f = FIELDS[name]
    if f.default is _MISSING or f.default is None or f.default == ():
        return None
    v = f.default
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# EDGE_AGENT_* variables that are not settings but are still ours (add new ones here, or they are refused).
EXTRA_ENV = ("CONFIG", "CRASH_AT")
ENV_NAMES = frozenset(ENV_PREFIX + k.upper() for k in (*FIELDS, *EXTRA_ENV))

# Sane ranges for every numeric setting: (lowest, highest, why the ceiling). A value past the ceiling is a
# typo or a unit mistake (max_file_mb=1e13 made every image an internal error), never a real need.
BOUNDS: dict[str, tuple[float, float, str]] = {
    "threads": (1, 256, "more threads than cores only adds contention"),
    "workers": (1, 64, "each worker holds an image in memory"),
    "batch_size": (1, 256, "larger batches only add latency and memory"),
    "queue_max": (1, 4096, "every queued image holds its pixels in memory"),
    "max_pixels": (1, 1 << 30, "OpenCV's own limit; a 1-gigapixel image needs gigabytes to decode"),
    "max_file_mb": (0, 2048, "a file is read into memory whole; dermoscopy exports are far smaller"),
    "decode_cpu_seconds": (1, 3600, "an hour of CPU for one image is a stuck or hostile decoder"),
    "spot_check_fraction": (0, 1, "a fraction"),
    "quiet_seconds": (0, 3600, "an hour without change is more than any copy needs"),
    "rescan_seconds": (0, 86400, "at least once a day"),
    "partial_timeout_seconds": (0, 7 * 86400, "an upload silent for a week is abandoned"),
    "min_sharpness": (0, 1e6, "the variance of the Laplacian of an 8-bit image stays far below this"),
    "min_brightness": (0, 255, "8-bit brightness"),
    "max_brightness": (0, 255, "8-bit brightness"),
    "max_clipped_fraction": (0, 1, "a fraction"),
    "min_free_mb": (0, 1e12, "an exabyte; a larger value is a unit mistake"),
    "keep_processed_days": (0, 36500, "a hundred years"),
    "keep_quarantine_days": (0, 36500, "a hundred years"),
    "prune_free_mb": (0, 1e12, "an exabyte; a larger value is a unit mistake"),
    "prune_seconds": (1, 7 * 86400, "at least once a week"),
    "metrics_seconds": (1, 3600, "node_exporter reads it every scrape; older figures are no use to an alert"),
}


def _coerce(name: str, value: Any, source: str) -> Any:
    """Turn a raw value (string from env/flags, TOML value) into the setting's type."""
    f = FIELDS[name]
    typ = f.type if isinstance(f.type, str) else str(f.type)
    where = f"{name} (from {source})"
    try:
        if typ.startswith("tuple[Path"):
            items = [x.strip() for x in value.split(",")] if isinstance(value, str) else list(value)
            if not all(isinstance(x, (str, os.PathLike)) and os.fspath(x) for x in items):
                raise TypeError
            return tuple(Path(os.path.expanduser(os.fspath(x))) for x in items)
        if "Path" in typ:
            if value in (None, ""):
                return None
            if not isinstance(value, (str, os.PathLike)):
                raise TypeError
            return Path(os.path.expanduser(os.fspath(value)))
        if typ.startswith("tuple"):
            items = [x.strip() for x in value.split(",")] if isinstance(value, str) else list(value)
            if not all(isinstance(x, str) and x for x in items):
                raise TypeError
            return tuple(items)
        if typ.startswith("dict"):
            return _parse_thresholds(value)
        if typ == "bool":
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off", ""):
                return False
            raise ValueError
        if typ == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(str(value).replace("_", "")) if isinstance(value, str) else int(value)
        if typ == "float":
            if isinstance(value, bool):
                raise ValueError
            v = float(value)
            if not math.isfinite(v):
                raise ValueError
            return v
        if typ == "str":
            if not isinstance(value, str):
                raise TypeError
            return value.strip()
    except (TypeError, ValueError) as e:
        detail = f": {e}" if isinstance(e, ConfigError) else ""
        raise ConfigError(f"{where} has an invalid value {value!r}{detail}; expected {_expected(typ)}. "
                          f"{name}: {HELP[name]}") from None
    raise AssertionError(f"unhandled setting type {typ} for {name}")  # pragma: no cover


def _expected(typ: str) -> str:
    return {"int": "a whole number", "float": "a number", "bool": "true or false", "str": "text",
            "tuple[Path, ...]": "a list of paths (comma-separated in the environment)"}.get(
        typ, "a path" if "Path" in typ else "a comma-separated list" if typ.startswith("tuple")
        else "NAME=PROBABILITY pairs" if typ.startswith("dict") else typ)


def _parse_thresholds(value: Any) -> dict[str, float]:
    if isinstance(value, Mapping):
        pairs = list(value.items())
    else:
        items = value.split(",") if isinstance(value, str) else list(value)
        pairs = []
        for item in (x.strip() for x in items):
            if not item:
                continue
            if "=" not in item:
                raise ConfigError(f"threshold {item!r} must look like NAME=PROBABILITY, e.g. melanoma=0.2")
            k, v = item.split("=", 1)
            pairs.append((k.strip(), v.strip()))
    out: dict[str, float] = {}
    for k, v in pairs:
        try:
            p = float(v)
        except (TypeError, ValueError):
            raise ConfigError(f"threshold {k}={v!r} is not a number; use a probability between 0 and 1") from None
        if not (0.0 <= p <= 1.0) or not k:
            raise ConfigError(f"threshold {k}={v!r} must be a probability between 0 and 1")
        out[str(k)] = p
    return out


MAX_CONFIG_BYTES = 1 << 20  # a settings file is a few hundred bytes; anything near this is not one


def read_toml(path: Path) -> dict[str, Any]:
    """Settings from a TOML file: top-level keys, or an [edge_agent] table (so it can share a file).

    Opened without blocking and checked before parsing: a pipe or a device
    given as the config file would hang the start or never end, a huge file
    would be parsed into memory; neither is a settings file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist: fix --config / EDGE_AGENT_CONFIG or create it") from None
    except OSError as e:
        raise ConfigError(f"config file {path} cannot be read ({e.strerror}); check the path and that the agent's "
                          "user may read it") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise ConfigError(f"config file {path} is a folder; pass the settings file itself, e.g. "
                              f"{Path(path) / 'config.toml'}")
        if not stat.S_ISREG(mode):
            raise ConfigError(f"config file {path} is not a regular file (a pipe, socket or device); pass a TOML "
                              "settings file")
        with open(fd, "rb", closefd=False) as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    finally:
        os.close(fd)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {path} is larger than {MAX_CONFIG_BYTES // 2**20} MiB: not a settings file; "
                          "check --config / EDGE_AGENT_CONFIG")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    except (tomllib.TOMLDecodeError, RecursionError) as e:
        raise ConfigError(f"config file {path} cannot be read as TOML ({e}); fix the syntax") from None
    table = data.get("edge_agent", data)
    if not isinstance(table, dict):
        raise ConfigError(f"config file {path}: [edge_agent] must be a table of settings")
    return {k.replace("-", "_"): v for k, v in table.items()}


def load_settings(flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None,
                  config_file: Path | None = None) -> Settings:
    """Merge the four sources (flags > env > file > defaults) and validate the result."""
    env = os.environ if environ is None else environ
    flags = {k: v for k, v in (flags or {}).items() if v is not None and v != () and v != {}}
    cfg_path = config_file or (Path(env[ENV_PREFIX + "CONFIG"]) if env.get(ENV_PREFIX + "CONFIG") else None)
    values: dict[str, Any] = {}
    if cfg_path is not None:
        for k, v in read_toml(cfg_path).items():
            if k not in FIELDS:
                raise ConfigError(f"unknown setting {k!r} in {cfg_path}; known settings: {', '.join(FIELDS)}")
            values[k] = _coerce(k, v, f"config file {cfg_path}")
            _absolute_in_file(k, values[k], cfg_path)
    unknown = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in ENV_NAMES)
    if unknown:
        raise ConfigError(f"unknown environment variable{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}: a "
                          "misspelt setting would silently be ignored; unset it or use one of "
                          f"{', '.join(sorted(ENV_NAMES))}")
    for k in FIELDS:
        raw = env.get(ENV_PREFIX + k.upper())
        if raw is not None and raw != "":
            values[k] = _coerce(k, raw, f"environment {ENV_PREFIX + k.upper()}")
    for k, v in flags.items():
        if k not in FIELDS:
            raise ConfigError(f"unknown setting {k!r}; known settings: {', '.join(FIELDS)}")
        values[k] = _coerce(k, v, "command line")
    settings = replace(Settings(), **values)
    validate(settings, config=cfg_path)
    return settings


def _num(x: float) -> str:
    return f"{int(x):_}" if float(x).is_integer() else f"{x:g}"


def validate(s: Settings, config: Path | None = None) -> None:
    """Range checks, then the layout of the paths (`config`: the settings file they came from); raises
    ConfigError."""
    def bad(name: str, why: str) -> ConfigError:
        return ConfigError(f"{name}={getattr(s, name)!r} {why}. {name}: {HELP[name]}")

    if s.after not in AFTER_CHOICES:
        raise bad("after", f"is not one of {', '.join(AFTER_CHOICES)}")
    if s.log_level.upper() not in LOG_LEVELS:
        raise bad("log_level", f"is not one of {', '.join(LOG_LEVELS)}")
    for name in ("threads", "workers", "batch_size", "queue_max", "max_pixels"):
        if getattr(s, name) < 1:
            raise bad(name, "must be at least 1")
    if s.batch_size > 256:
        raise bad("batch_size", "must be at most 256 (larger batches only add latency and memory)")
    if not 0.0 <= s.spot_check_fraction <= 1.0:
        raise bad("spot_check_fraction", "must be between 0 and 1")
    for name in ("quiet_seconds", "min_free_mb", "min_sharpness"):
        if getattr(s, name) < 0:
            raise bad(name, "must not be negative")
    for name in ("rescan_seconds", "partial_timeout_seconds", "max_file_mb"):
        if getattr(s, name) <= 0:
            raise bad(name, "must be greater than 0")
    if not 0 <= s.min_brightness < s.max_brightness <= 255:
        raise ConfigError(f"min_brightness={s.min_brightness} and max_brightness={s.max_brightness} must satisfy "
                          "0 <= min_brightness < max_brightness <= 255")
    if not 0 < s.max_clipped_fraction <= 1:
        raise bad("max_clipped_fraction", "must be in (0, 1]")
    for name, (lo, hi, why) in BOUNDS.items():
        v = getattr(s, name)
        if not lo <= v <= hi:
            raise bad(name, f"is out of range: it must be between {_num(lo)} and {_num(hi)} ({why})")
    if not s.providers:
        raise bad("providers", "must name at least one onnxruntime execution provider, e.g. CPUExecutionProvider")
    from .paths import check_layout  # real paths: output folders, database and bundle outside the inbox

    check_layout(s, config)


def _absolute_in_file(name: str, value: Any, cfg_path: Path) -> None:
    """A relative path in the settings file would depend on the folder the agent happens to start in (/ under
    systemd, the shell's folder by hand): the same file would mean two places. Refused, with the fix."""
    for p in value if isinstance(value, tuple) else (value,):
        if isinstance(p, Path) and not p.is_absolute():
            raise ConfigError(f"{name} = {str(p)!r} in config file {cfg_path} is a relative path: it would depend on "
                              "the folder the agent is started from (/ under systemd); write the absolute path, "
                              f"e.g. {os.path.abspath(p)}")
