"""A build recipe as data: `build-model all --recipe FILE` (TOML).

Why: the shipped bundle must be rebuildable from the repository, and a model trained in several
stages (e.g. 160 px, then 192 px from the first stage's best checkpoint) cannot be written as one
command line. The recipe names the data sources, the data options and every stage with its
settings; the manifest records the recipe's text and, per stage, its full settings and the
equivalent stand-alone `build-model` command, so each stage can also be rerun by hand.

    name = "default"
    seed = 0
    base = ".."                 # data paths are relative to this folder, itself relative to this file
    [data]
    ham10000 = "../shared/data/ham10000"
    [options]                   # optional: label_map = ["SRC:FROM=TO"], holdout_source, drop_small_classes
    [[stage]]
    kind = "train"              # any TrainConfig field (cli flags with underscores)
    name = "s160"
    image_size = 160
    [[stage]]
    kind = "train"
    init_from = "@previous"     # or "@<stage name>" or a checkpoint path (relative to base)
    [[stage]]
    kind = "quantize"           # calib_size, adaround_iters, reproducible
    [[stage]]
    kind = "validate"           # tta
    [[stage]]
    kind = "bundle"

Train stages work in `<workdir>/<stage name>/` (each resumes on its own); export, quantize,
validate and bundle work in the last train stage's folder. An `export` stage may be written;
it is added before `quantize` when it is not.
"""
from __future__ import annotations

import hashlib
import shlex
import sys
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

from edge_agent.preprocess import RESIZE_RULES, views_problem

from .errors import ConfigError, DataError, DataNotFound
from .train import TrainConfig, preprocessing_for

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

KINDS = ("train", "export", "quantize", "validate", "bundle")
AFTER_TRAIN = ("export", "quantize", "validate", "bundle")
STAGE_KEYS = {
    "train": {f.name for f in fields(TrainConfig)},
    "export": set(),
    "quantize": {"calib_size", "adaround_iters", "reproducible"},
    "validate": {"tta", "views"},
    "bundle": set(),
}
TOP_KEYS = {"name", "description", "seed", "base", "data", "options", "stage"}
OPTION_KEYS = {"label_map", "holdout_source", "drop_small_classes"}


@dataclass
class Stage:
    kind: str
    name: str
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    path: Path
    text: str
    name: str
    seed: int
    base: Path
    data: dict[str, Path]                 # source name -> path (overrides applied, absolute)
    label_map: tuple[str, ...]
    holdout: str | None
    drop_small: bool
    stages: list[Stage]
    overrides: list[str] = field(default_factory=list)

    def data_specs(self) -> tuple[str, ...]:
        return tuple(f"{n}={p}" for n, p in self.data.items())

    def train_stages(self) -> list[Stage]:
        return [s for s in self.stages if s.kind == "train"]

    def record(self) -> dict:
        """What the manifest keeps as `training.recipe`: the file's text, its digest and the resolved data."""
        return {"file": str(self.path), "name": self.name, "sha256": hashlib.sha256(self.text.encode()).hexdigest(),
                "seed": self.seed, "data": {n: str(p) for n, p in self.data.items()}, "data_overrides": self.overrides,
                "options": {"label_map": list(self.label_map), "holdout_source": self.holdout,
                            "drop_small_classes": self.drop_small},
                "text": self.text}


def _where(path: Path, what: str) -> str:
    return f"recipe {path}: {what}"


def load_recipe(path: Path, data_overrides: tuple[str, ...] = ()) -> Recipe:
    """Parse and check a recipe; every mistake is a ConfigError naming the recipe, the stage and the key."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"recipe {path} does not exist (the default bundle's is recipes/default.toml)") from None
    except OSError as e:
        raise ConfigError(f"recipe {path} cannot be read: {e.strerror}") from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(_where(path, f"not valid TOML: {e}")) from None
    unknown = set(doc) - TOP_KEYS
    if unknown:
        raise ConfigError(_where(path, f"unknown key(s) {sorted(unknown)}; a recipe has {sorted(TOP_KEYS)}"))
    base = (path.parent / str(doc.get("base", "."))).resolve()
    seed = doc.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(_where(path, f"seed = {seed!r} is not an integer"))
    data = doc.get("data", {})
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise ConfigError(_where(path, "[data] holds NAME = \"PATH\" entries (one per source)"))
    sources = {n: (base / p).resolve() for n, p in data.items()}
    overrides = list(data_overrides)
    for spec in data_overrides:
        name, _, p = spec.partition("=")
        if not _ or not p:
            if len(sources) != 1:
                raise ConfigError(f"--data {spec!r}: the recipe has several sources ({', '.join(sources)}); "
                                  "write NAME=PATH to replace one")
            name, p = next(iter(sources)), spec
        if name not in sources:
            raise ConfigError(f"--data {spec!r}: the recipe has no source {name!r}; its sources are {', '.join(sources)}")
        sources[name] = Path(p).resolve()
    if not sources:
        raise ConfigError(_where(path, "[data] names no source: add NAME = \"PATH\" entries"))
    for name, p in sources.items():
        if not p.exists():
            raise DataNotFound(f"recipe source {name}: {p} does not exist: get the data (README 'Retraining') or "
                               f"point at it with --data {name}=PATH")
    opts = doc.get("options", {})
    unknown = set(opts) - OPTION_KEYS
    if unknown:
        raise ConfigError(_where(path, f"[options] has unknown key(s) {sorted(unknown)}; known: {sorted(OPTION_KEYS)}"))
    label_map = opts.get("label_map", [])
    if isinstance(label_map, str):
        label_map = [label_map]
    stages = _stages(path, doc.get("stage", []), base)
    return Recipe(path=path.resolve(), text=text, name=str(doc.get("name", path.stem)), seed=seed, base=base,
                  data=sources, label_map=tuple(label_map), holdout=opts.get("holdout_source") or None,
                  drop_small=bool(opts.get("drop_small_classes", False)), stages=stages, overrides=overrides)


def _stages(path: Path, raw: Any, base: Path) -> list[Stage]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError(_where(path, "no [[stage]] tables: a recipe needs train, quantize, validate and bundle stages"))
    stages: list[Stage] = []
    defaults = asdict(TrainConfig())
    for i, table in enumerate(raw, 1):
        kind = table.get("kind")
        if kind not in KINDS:
            raise ConfigError(_where(path, f"stage {i} has kind = {kind!r}; one of {', '.join(KINDS)}"))
        name = str(table.get("name", f"{kind}{i}" if kind == "train" else kind))
        settings = {k: v for k, v in table.items() if k not in ("kind", "name")}
        unknown = set(settings) - STAGE_KEYS[kind]
        if unknown:
            raise ConfigError(_where(path, f"stage {i} ({kind} {name!r}): unknown setting(s) {sorted(unknown)}; "
                                           f"known: {sorted(STAGE_KEYS[kind]) or 'none'}"))
        if kind == "train":
            for k, v in settings.items():
                want = type(defaults[k])
                ok = isinstance(v, want) and not (want is not bool and isinstance(v, bool)) or \
                    (want is float and isinstance(v, int) and not isinstance(v, bool))
                if not ok:
                    raise ConfigError(_where(path, f"stage {i} ({name!r}): {k} = {v!r} should be a {want.__name__}"))
            settings = {k: float(v) if type(defaults[k]) is float else v for k, v in settings.items()}
        for k in ("calib_size", "adaround_iters"):
            if k in settings and (not isinstance(settings[k], int) or isinstance(settings[k], bool) or settings[k] < 0):
                raise ConfigError(_where(path, f"stage {i} ({kind}): {k} = {settings[k]!r} should be a whole number >= 0"))
        if kind == "quantize" and not isinstance(settings.get("reproducible", False), bool):
            raise ConfigError(_where(path, f"stage {i} (quantize): reproducible = {settings['reproducible']!r} should be "
                                           "true or false"))
        if kind == "train" and settings.get("resize", RESIZE_RULES[0]) not in RESIZE_RULES:
            raise ConfigError(_where(path, f"stage {i} (train {name!r}): resize = {settings['resize']!r}; one of "
                                           f"{', '.join(RESIZE_RULES)}"))
        if kind == "validate" and settings.get("tta", "none") not in ("none", "hflip"):
            raise ConfigError(_where(path, f"stage {i} (validate): tta = {settings['tta']!r}; none or hflip"))
        if kind == "validate" and "views" in settings:
            views = settings["views"]
            problem = views_problem(views) if views != [] else ""
            if problem:
                raise ConfigError(_where(path, f"stage {i} (validate): views = {views!r} {problem}; the first the "
                                               "train stage's resize, or [] for one view"))
        stages.append(Stage(kind, name, settings))
    names = [s.name for s in stages]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(_where(path, f"stage names {dup} are used twice; give each stage its own name"))
    kinds = [s.kind for s in stages]
    n_train = kinds.count("train")
    if n_train == 0 or kinds[:n_train] != ["train"] * n_train:
        raise ConfigError(_where(path, f"stages run {kinds}: train stages come first, then quantize, validate, bundle"))
    rest = [k for k in kinds[n_train:] if k != "export"]
    if rest != ["quantize", "validate", "bundle"] or kinds[n_train:].count("export") > 1 or \
            ("export" in kinds and kinds[n_train] != "export"):
        raise ConfigError(_where(path, f"after the train stages come [export,] quantize, validate, bundle, once each "
                                       f"in this order; the recipe has {kinds[n_train:]}"))
    if "export" not in kinds:
        stages.insert(n_train, Stage("export", "export"))
    seen: list[str] = []
    for s in stages[:n_train]:
        ref = s.settings.get("init_from", "")
        if ref.startswith("@"):
            target = seen[-1] if ref == "@previous" and seen else ref[1:]
            if target not in seen:
                raise ConfigError(_where(path, f"stage {s.name!r}: init_from = {ref!r} names no earlier train stage "
                                               f"({', '.join(seen) or 'there is none'})"))
            s.settings["init_from"] = "@" + target
        elif ref:
            s.settings["init_from"] = str((base / ref).resolve())
        seen.append(s.name)
    return stages


def train_config(stage: Stage, seed: int, work: Path) -> TrainConfig:
    """The stage's full TrainConfig; `@stage` references become that stage's best.pt under `work`."""
    settings = dict(stage.settings)
    ref = settings.get("init_from", "")
    if ref.startswith("@"):
        settings["init_from"] = str(work / ref[1:] / "best.pt")
    settings.setdefault("seed", seed)
    return replace(TrainConfig(), **settings)


def _flag(name: str, value: Any) -> list[str]:
    flag = "--" + name.replace("_", "-")
    if isinstance(value, list):  # views: one comma-separated value ([] = the option left out)
        return [flag, ",".join(map(str, value))] if value else []
    if isinstance(value, bool):
        return [flag if value else "--no-" + name.replace("_", "-")]
    return [flag, str(value)]


def stage_command(recipe: Recipe, stage: Stage, out: Path, work: Path, settings: dict) -> str:
    """The stand-alone `build-model` command that runs this stage as the recipe did."""
    args = ["build-model", stage.kind]
    for spec in recipe.data_specs():
        args += ["--data", spec]
    for lm in recipe.label_map:
        args += ["--label-map", lm]
    if recipe.holdout:
        args += ["--holdout-source", recipe.holdout]
    if recipe.drop_small:
        args.append("--drop-small-classes")
    args += ["--out", str(Path(out).resolve()), "--workdir", str(Path(work).resolve()), "--seed", str(recipe.seed)]
    for k, v in settings.items():
        if k == "seed" and stage.kind == "train":
            continue
        if k == "signing_key":
            if v:
                args += ["--signing-key", str(v)]
            continue
        args += _flag(k, v)
    return " ".join(shlex.quote(a) for a in args)


Log = Callable[[str], None]


def run_recipe(recipe: Recipe, ds, split, out: Path, work: Path, log: Log, *, padding: Callable[[Path, int], None],
               resume: bool = True, signing_key: Path | None = None, build_command: str = "") -> dict:
    """Run every stage in order; return the bundle's manifest (with training.recipe and training.stages)."""

    from . import stages as st
    from .train import train as run_train

    workdirs: dict[str, Path] = {}
    configs: dict[str, TrainConfig] = {}
    for stage in recipe.train_stages():
        cfg = train_config(stage, recipe.seed, work)
        stage_work = work / stage.name
        padding(stage_work, cfg.image_size)
        if cfg.init_from and not Path(cfg.init_from).is_file():
            raise DataError(f"recipe stage {stage.name!r}: init_from {cfg.init_from} does not exist (did the stage it "
                            "names finish?)")
        log(f"recipe {recipe.name}: stage {stage.name} (train {cfg.image_size} px, {cfg.epochs} epochs"
            + (f", from {cfg.init_from}" if cfg.init_from else "") + ")")
        run_train(ds, split, stage_work, cfg, preprocessing_for(cfg), resume=resume, log=log)
        workdirs[stage.name], configs[stage.name] = stage_work, cfg
    records = stage_records(recipe, out, workdirs, configs, signing_key)
    last_work = workdirs[recipe.train_stages()[-1].name]
    q = next(r["settings"] for r in records if r["kind"] == "quantize")
    v = next(r["settings"] for r in records if r["kind"] == "validate")
    st.export(ds, split, last_work, log)
    st.quantize_stage(ds, split, last_work, log, q["calib_size"], recipe.seed, adaround_iters=q["adaround_iters"],
                      reproducible=q.get("reproducible", False))
    st.validate(ds, split, last_work, log, recipe.seed, tta=v["tta"], views=tuple(v.get("views", ())))
    return st.bundle(ds, split, last_work, out, build_command, log, signing_key=signing_key,
                     training_extra={"recipe": recipe.record(), "stages": records})


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else _toml_value(k)


def options_recipe(data: tuple[str, ...], label_map: tuple[str, ...], holdout: str | None, drop_small: bool, seed: int,
                   trains: list[tuple[str, TrainConfig]], calib_size: int, adaround_iters: int, tta: str,
                   reproducible: bool = False, views: tuple[str, ...] = ()) -> Recipe:
    """The recipe equivalent to a plain `build-model all ...` command line (so its manifest has one too).

    Why: a bundle built from flags must be as reproducible as one built from a file; its manifest then
    carries a recipe that `all --recipe` runs (train stages then work in <workdir>/<stage name>/).
    """
    from .data import parse_source

    sources: dict[str, Path] = {}
    for spec in data:
        name, p = parse_source(spec)
        sources[name or Path(p).name] = Path(p).resolve()
    lines = ['name = "command-line"', f"seed = {seed}", 'base = "/"', "", "[data]"]
    lines += [f"{_key(n)} = {_toml_value(str(p))}" for n, p in sources.items()]
    lines += ["", "[options]", f"label_map = {_toml_value(list(label_map))}",
              f"holdout_source = {_toml_value(holdout or '')}", f"drop_small_classes = {_toml_value(drop_small)}"]
    stages: list[Stage] = []
    previous = ""
    for name, cfg in trains:
        settings = {k: v for k, v in asdict(cfg).items() if k != "seed"}
        if previous and settings.get("init_from"):
            settings["init_from"] = "@" + previous
        lines += ["", "[[stage]]", 'kind = "train"', f"name = {_toml_value(name)}"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in settings.items()]
        stages.append(Stage("train", name, settings))
        previous = name
    q_settings: dict[str, Any] = {"calib_size": calib_size, "adaround_iters": adaround_iters}
    if reproducible:
        q_settings["reproducible"] = True
    tail = [Stage("export", "export"), Stage("quantize", "quantize", q_settings),
            Stage("validate", "validate", {"tta": tta, **({"views": list(views)} if views else {})}),
            Stage("bundle", "bundle")]
    for s in tail[1:]:
        lines += ["", "[[stage]]", f'kind = "{s.kind}"'] + [f"{k} = {_toml_value(v)}" for k, v in s.settings.items()]
    text = "\n".join(lines) + "\n"
    return Recipe(path=Path("<command line>"), text=text, name="command-line", seed=seed, base=Path("/"), data=sources,
                  label_map=tuple(label_map), holdout=holdout, drop_small=drop_small, stages=stages + tail)


def stage_records(recipe: Recipe, out: Path, workdirs: dict[str, Path], configs: dict[str, TrainConfig],
                  signing_key: Path | None = None) -> list[dict]:
    """Per stage: name, kind, work folder, full settings and the stand-alone command (`training.stages`)."""
    import torch

    records = []
    last = next(reversed(workdirs.values()))
    for s in recipe.stages:
        if s.kind == "train":
            settings = asdict(configs[s.name])
            work = workdirs[s.name]
            rec = {"name": s.name, "kind": "train", "workdir": str(work), "settings": settings,
                   "command": stage_command(recipe, s, out, work, settings)}
            if (work / "best.pt").is_file():
                ck = torch.load(work / "best.pt", map_location="cpu", weights_only=False)
                rec |= {"best_epoch": ck.get("epoch"),
                        "best_val": {k: ck.get("val", {}).get(k) for k in ("balanced_accuracy", "macro_auc", "accuracy")}}
            records.append(rec)
            continue
        from .quantize import ADAROUND_ITERS, CALIB_SIZE

        settings = {"quantize": {"calib_size": CALIB_SIZE, "adaround_iters": ADAROUND_ITERS},
                    "validate": {"tta": "none"}}.get(s.kind, {}) | s.settings
        if s.kind == "bundle":
            settings = {"signing_key": str(signing_key) if signing_key else ""}
        records.append({"name": s.name, "kind": s.kind, "workdir": str(last), "settings": settings,
                        "command": stage_command(recipe, s, out, last, settings)})
    return records
