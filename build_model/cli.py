"""`build-model`: one command for the whole pipeline, one sub-command per stage.

Stages read and write files in a work folder (`--workdir`, default
`<out>.work`), so each can run alone, and a rerun skips what is done.
"""
from __future__ import annotations

import json
import shlex
import shutil
import sys
from dataclasses import fields
from pathlib import Path

from .errors import require_build_extra

require_build_extra()  # a runtime-only install: one line naming the extra, not ModuleNotFoundError: torch

import click  # noqa: E402

from edge_agent.preprocess import RESIZE_RULES, views_problem  # noqa: E402

from .errors import BuildError, build_extra_message, missing_build_module  # noqa: E402
from .quantize import ADAROUND_ITERS, CALIB_SIZE  # noqa: E402
from .train import TrainConfig, preprocessing_for  # noqa: E402


def _log(msg: str) -> None:
    click.echo(msg, err=True)


def workdir_for(out: Path, workdir: Path | None) -> Path:
    return workdir or out.with_name(out.name + ".work")


# Set by the group-level data options of the command being run (see `data_options`).
_SOURCES: dict = {"label_map": (), "holdout": None, "drop_small": False}


class BuildExtraMissing(click.ClickException):
    exit_code = 2


class BuildGroup(click.Group):
    """Reports every expected failure (BuildError, a missing build-extra package) as one line, not a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BuildError as e:
            raise click.ClickException(str(e)) from None
        except ModuleNotFoundError as e:
            if missing_build_module(e) is None:
                raise
            raise BuildExtraMissing(build_extra_message([missing_build_module(e) or ""])) from None


def data_and_split(data: tuple[Path, ...] | Path, out: Path, seed: int):
    """Load every --data source; reuse <out>/split.csv or write a new lesion-grouped split per source."""
    from .data import drop_small_classes, load_sources, parse_label_maps, read_split, split_sources, write_split

    specs = list(data) if isinstance(data, (tuple, list)) else [data]
    if not specs:
        raise click.UsageError("Missing option '--data': give the training data (NAME=PATH or PATH; repeatable)")
    try:
        ds = load_sources(specs, parse_label_maps(_SOURCES["label_map"]))
    except (ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    if _SOURCES["drop_small"]:
        ds, dropped = drop_small_classes(ds, _SOURCES["holdout"])
        for name, classes in dropped.items():
            _log(f"--drop-small-classes: {name}: left out " + ", ".join(f"{c} ({g} lesions, {i} images)" for c, (g, i) in classes.items()))
    out.mkdir(parents=True, exist_ok=True)
    path = out / "split.csv"
    if path.exists():
        split = read_split(path, ds)
    else:
        try:
            split = split_sources(ds, seed=seed, holdout=_SOURCES["holdout"])
        except ValueError as e:
            raise click.ClickException(str(e)) from None
        write_split(path, ds, split)
    if len(ds.sources) > 1:
        _log("sources: " + ", ".join(f"{n} ({ds.source_info[n]['images']} images, classes {','.join(ds.source_labels[n])})"
                                     for n in ds.sources))
    return ds, split


def _remember_sources(ctx: click.Context, param: click.Parameter, value):
    _SOURCES[param.name if param.name in ("label_map", "drop_small") else "holdout"] = value
    return value


common_train = [
    click.option("--data", type=str, multiple=True,
                 help="(required) a source: HAM10000-layout folder, class-per-subfolder folder or MedMNIST .npz, "
                      "optionally named NAME=PATH; repeat for several sources (each split on its own, `source` column "
                      "in split.csv); with `all --recipe`: NAME=PATH replaces the recipe's source NAME"),
    click.option("--label-map", "label_map", multiple=True, expose_value=False, callback=_remember_sources,
                 help="SOURCE:FROM=TO[,FROM=TO] renames a source's labels onto the model's classes (repeatable)"),
    click.option("--holdout-source", "holdout", default=None, expose_value=False, callback=_remember_sources,
                 help="a source never trained on (split 'holdout'): leave-one-source-out, score it with `evaluate`"),
    click.option("--drop-small-classes", "drop_small", is_flag=True, expose_value=False, callback=_remember_sources,
                 help="leave out a source's classes with fewer than 3 lesions (too few for train/val/test) instead of "
                      "refusing the data; recorded in the manifest"),
    click.option("--out", type=click.Path(path_type=Path), required=True, help="bundle folder to write"),
    click.option("--workdir", type=click.Path(path_type=Path), default=None, help="checkpoints and intermediate files (default: <out>.work)"),
    click.option("--seed", type=int, default=0, show_default=True),
]


signing_key_option = click.option(
    "--signing-key", type=click.Path(path_type=Path), envvar="BUILD_MODEL_SIGNING_KEY", default=None,
    help="Ed25519 private key (from `build-model keygen`) that signs manifest.json; or BUILD_MODEL_SIGNING_KEY. "
         "Without it the bundle is unsigned and agents refuse it until `build-model sign`.")
trusted_key_option = click.option(
    "--trusted-key", "trusted_keys", multiple=True, type=click.Path(path_type=Path), metavar="PUBFILE",
    help="public key whose signature counts as trusted when verifying (repeatable; the project key always does)")


def with_options(opts):
    def deco(f):
        for o in reversed(opts):
            f = o(f)
        return f
    return deco


def train_options(f):
    for fld in reversed([f for f in fields(TrainConfig) if f.name != "seed"]):
        flag = fld.name.replace('_', '-')
        if isinstance(fld.default, bool):
            f = click.option(f"--{flag}/--no-{flag}", fld.name, default=None, help=f"default {fld.default}")(f)
        else:
            f = click.option(f"--{flag}", fld.name, type=type(fld.default), default=None,
                             help=f"default {fld.default}")(f)
    return f


def make_config(seed: int, overrides: dict) -> TrainConfig:
    vals = {k: v for k, v in overrides.items() if v is not None and k in TrainConfig.__dataclass_fields__}
    vals.setdefault("seed", seed)
    cfg = TrainConfig(**vals)
    check_config(cfg)
    return cfg


def check_config(cfg: TrainConfig) -> None:
    """Unknown names fail here, before data loading and hours of training, not at the first batch."""
    from .augment import AugmentConfig
    from .model import ARCHS

    if cfg.arch not in ARCHS:
        raise click.BadParameter(f"{cfg.arch!r}: choose one of {sorted(ARCHS)}", param_hint="--arch")
    if cfg.augment != "legacy":
        AugmentConfig.from_names(cfg.augment)  # ConfigError names the unknown ones
    if cfg.resize not in RESIZE_RULES:
        raise click.BadParameter(f"{cfg.resize!r}: choose one of {', '.join(RESIZE_RULES)}", param_hint="--resize")
    if cfg.device not in ("cpu", "cuda", "auto"):
        raise click.BadParameter(f"{cfg.device!r}: choose cpu, cuda or auto", param_hint="--device")


@click.group(cls=BuildGroup)
def main() -> None:
    """Build, check and benchmark the screening model bundle."""


@main.command()
@with_options(common_train)
@train_options
@click.option("--no-resume", is_flag=True, help="start over even if a checkpoint exists")
def train(data: tuple[str, ...], out: Path, workdir: Path | None, seed: int, no_resume: bool, **kw) -> None:
    """Fine-tune EfficientNet-Lite0 (resumes from <workdir>/last.pt)."""
    from .train import train as run

    cfg = make_config(seed, kw)
    ds, split = data_and_split(data, out, seed)
    pre = preprocessing_for(cfg)
    _padding(workdir_for(out, workdir), cfg.image_size)
    best = run(ds, split, workdir_for(out, workdir), cfg, pre, resume=not no_resume, log=_log)
    _log(f"best checkpoint: {best}")


def _stage_args(data: tuple[str, ...], out: Path, workdir: Path | None, seed: int):
    ds, split = data_and_split(data, out, seed)
    return ds, split, workdir_for(out, workdir)


@main.command()
@with_options(common_train)
def export(data: tuple[str, ...], out: Path, workdir: Path | None, seed: int) -> None:
    """Export best.pt to ONNX (opset 17, dynamic batch) and check parity with PyTorch."""
    from .stages import export as run

    ds, split, work = _stage_args(data, out, workdir, seed)
    run(ds, split, work, _log)


adaround_option = click.option(
    "--adaround-iters", type=int, default=ADAROUND_ITERS, show_default=True,
    help="optimisation steps per convolution for the AdaRound candidate (weights rounded up or down to match the "
         "float network's outputs; about 18 min at 192 px on 2 cores); 0 skips it")


reproducible_option = click.option(
    "--reproducible/--no-reproducible", default=False, show_default=True,
    help="INT8 arithmetic that gives the same probabilities on every CPU (x86-64, aarch64): the FP32 front on exact "
         "integer grids, residual additions unfused (build_model/reproducible.py); the gate judges that model")


@main.command()
@with_options(common_train)
@click.option("--calib-size", type=int, default=CALIB_SIZE, show_default=True, help="calibration images (training split, stratified)")
@adaround_option
@reproducible_option
def quantize(data: tuple[str, ...], out: Path, workdir: Path | None, seed: int, calib_size: int, adaround_iters: int,
             reproducible: bool) -> None:
    """Static INT8 (QDQ, per-channel); compares MinMax/Entropy/Percentile x reduce_range, and AdaRound, on the validation split."""
    from .stages import quantize_stage

    ds, split, work = _stage_args(data, out, workdir, seed)
    quantize_stage(ds, split, work, _log, calib_size, seed, adaround_iters=adaround_iters, reproducible=reproducible)


tta_option = click.option("--tta", type=click.Choice(["none", "hflip"]), default="none", show_default=True,
                          help="test-time augmentation the bundle asks the agent for (hflip: mean of the image and its "
                               "mirror; twice the inference cost); the gate, temperature and thresholds use it too")


def _views(value: str | None) -> tuple[str, ...]:
    views = tuple(v.strip() for v in (value or "").split(",") if v.strip())
    if views and views_problem(views):
        raise click.BadParameter(f"{value!r} {views_problem(views)}, comma-separated, the first the trained model's "
                                 "resize; or leave it out for one view", param_hint="--views")
    return views


views_option = click.option(
    "--views", default=None, metavar="RULE,RULE",
    help="screen several views of each image and average their logits, e.g. shorter_side_center_crop,lesion_crop "
         "(the centre square and the square around the lesion: docs/generalisation.md); one inference per view; "
         "the gate, temperature, thresholds and OOD statistics use them too")


@main.command()
@with_options(common_train)
@tta_option
@views_option
def validate(data: tuple[str, ...], out: Path, workdir: Path | None, seed: int, tta: str, views: str | None) -> None:
    """Gate INT8 against FP32 on the test split; fit temperature and review thresholds on validation."""
    from .stages import validate as run

    views_t = _views(views)
    ds, split, work = _stage_args(data, out, workdir, seed)
    run(ds, split, work, _log, seed, tta=tta, views=views_t)


@main.command()
@with_options(common_train)
@signing_key_option
def bundle(data: tuple[str, ...], out: Path, workdir: Path | None, seed: int, signing_key: Path | None) -> None:
    """Write the bundle folder (ONNX files, split, report.md, manifest.json, manifest.sig) and verify it."""
    from .stages import bundle as run

    _check_signing_key(signing_key)
    ds, split, work = _stage_args(data, out, workdir, seed)
    run(ds, split, work, out, _command_line(), _log, signing_key=signing_key)
    _verify_or_exit(out, signing_key=signing_key)


@main.command()
@with_options(common_train)
@train_options
@click.option("--no-resume", is_flag=True, help="start over even if a checkpoint exists")
@click.option("--calib-size", type=int, default=CALIB_SIZE, show_default=True)
@click.option("--qat-epochs", type=int, default=0, show_default=True,
              help="after training, this many epochs of quantization-aware fine-tuning (in <workdir>/qat), aimed "
                   "at INT8/FP32 agreement; exported instead of the float model; 0 skips it")
@click.option("--qat-lr", type=float, default=1e-4, show_default=True, help="peak learning rate of the QAT epochs")
@adaround_option
@reproducible_option
@signing_key_option
@tta_option
@views_option
@click.option("--recipe", "recipe_path", type=click.Path(path_type=Path), default=None,
              help="a TOML recipe (data sources, every stage and its settings; e.g. recipes/default.toml, the default "
                   "bundle's): runs its stages instead of the options here; --data NAME=PATH replaces a source")
@click.pass_context
def all(ctx: click.Context, data: tuple[str, ...], out: Path, workdir: Path | None, seed: int, no_resume: bool,
        calib_size: int, qat_epochs: int, qat_lr: float, adaround_iters: int, reproducible: bool,
        signing_key: Path | None, tta: str, views: str | None, recipe_path: Path | None, **kw) -> None:
    """Run every stage: train, [QAT,] export, quantize, validate, bundle (each resumes or redoes its part)."""
    from dataclasses import replace

    from . import stages

    _check_signing_key(signing_key)
    if recipe_path is not None:
        _run_recipe(ctx, recipe_path, data, out, workdir, no_resume, signing_key)
        return
    cfg = make_config(seed, kw)
    views_t = _views(views)
    if views_t and views_t[0] != cfg.resize:
        raise click.BadParameter(f"the first view must be the model's --resize {cfg.resize!r}", param_hint="--views")
    ds, split = data_and_split(data, out, seed)
    work = workdir_for(out, workdir)
    _padding(work, cfg.image_size)
    from .train import train as run_train

    pre = preprocessing_for(cfg)
    best = run_train(ds, split, work, cfg, pre, resume=not no_resume, log=_log)
    trains, workdirs = [("train", cfg)], {"train": work}
    if qat_epochs > 0 and not cfg.qat:
        qcfg = replace(cfg, epochs=qat_epochs, lr=qat_lr, warmup_epochs=0.1, label_smoothing=0.0, qat=True,
                       init_from=str(best))
        work = work / "qat"
        work.mkdir(exist_ok=True)
        shutil.copyfile(work.parent / "padding.json", work / "padding.json")
        _log(f"quantization-aware fine-tuning: {qat_epochs} epochs from {best}")
        run_train(ds, split, work, qcfg, pre, resume=not no_resume, log=_log)
        trains.append(("qat", qcfg))
        workdirs["qat"] = work
    from .recipe import options_recipe, stage_records

    recipe = options_recipe(data, _SOURCES["label_map"], _SOURCES["holdout"], _SOURCES["drop_small"], seed, trains,
                            calib_size, adaround_iters, tta, reproducible, views_t)
    records = stage_records(recipe, out, workdirs, dict(trains), signing_key)
    stages.export(ds, split, work, _log)
    stages.quantize_stage(ds, split, work, _log, calib_size, seed, adaround_iters=adaround_iters,
                          reproducible=reproducible)
    stages.validate(ds, split, work, _log, seed, tta=tta, views=views_t)
    stages.bundle(ds, split, work, out, _command_line(), _log, signing_key=signing_key,
                  training_extra={"recipe": recipe.record(), "stages": records})
    _verify_or_exit(out, signing_key=signing_key)


RECIPE_OWNS = ("seed", "calib_size", "qat_epochs", "qat_lr", "adaround_iters", "reproducible", "tta", "views", "label_map", "holdout",
               "drop_small")


def _run_recipe(ctx: click.Context, recipe_path: Path, data: tuple[str, ...], out: Path, workdir: Path | None,
                no_resume: bool, signing_key: Path | None) -> None:
    """`all --recipe`: the recipe sets every training and stage setting; the command line only where and how."""
    from click.core import ParameterSource

    from .recipe import load_recipe, run_recipe

    given = [p.opts[0] for p in ctx.command.params
             if (p.name in RECIPE_OWNS or p.name in TrainConfig.__dataclass_fields__)
             and ctx.get_parameter_source(p.name) == ParameterSource.COMMANDLINE]
    if given:
        raise click.UsageError(f"--recipe sets the training and stage settings; {', '.join(given)} belong in the recipe "
                               "file (copy it and edit the copy)")
    recipe = load_recipe(recipe_path, data)
    _SOURCES.update(label_map=recipe.label_map, holdout=recipe.holdout, drop_small=recipe.drop_small)
    ds, split = data_and_split(recipe.data_specs(), out, recipe.seed)
    run_recipe(recipe, ds, split, out, workdir_for(out, workdir).resolve(), _log, padding=_padding, resume=not no_resume,
               signing_key=signing_key, build_command=_command_line())
    _verify_or_exit(out, signing_key=signing_key)


def _padding(work: Path, image_size: int) -> None:
    """Refuse to train when the model code and the pretrained weights disagree on padding/scaling."""
    from .model import padding_check

    work.mkdir(parents=True, exist_ok=True)
    res = padding_check()
    (work / "padding.json").write_text(json.dumps(res, indent=2))
    best = max(res, key=lambda k: res[k]["mean_logp_true"])
    if best != "tf+127/128":
        raise BuildError(f"padding check: the ImageNet weights prefer {best}, not tf+127/128 ({res}); build_model/model.py is wrong for these weights")
    _log(f"padding check: tf+127/128 fits the weights best ({res[best]['mean_logp_true']:.3f} mean log-p)")


def _command_line() -> str:
    return "build-model " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def _check_signing_key(signing_key: Path | None) -> None:
    """A wrong key path must fail before hours of training, not at the end."""
    from edge_agent.signing import SigningError, load_private_key

    if signing_key is not None:
        try:
            load_private_key(signing_key)
        except SigningError as e:
            raise click.ClickException(str(e)) from None


def _verify_or_exit(path: Path, signing_key: Path | None = None, trusted_keys: tuple[Path, ...] = (),
                    require_signature: bool = False) -> None:
    """Verify a bundle as an agent would, trusting the project key, `trusted_keys` and the key that just signed
    it. An unsigned bundle is a warning here (the build may sign later) unless `require_signature`."""
    from dataclasses import replace

    from edge_agent.bundle import verify_bundle
    from edge_agent.signing import SigningError, TrustedKey, key_id, load_private_key, make_trust

    try:
        trust = make_trust(trusted_keys, allow_unsigned=not require_signature)
        if signing_key is not None:
            pub = load_private_key(signing_key).public_key()
            own = TrustedKey(pub, key_id(pub), f"signing key {signing_key}", signing_key)
            trust = replace(trust, keys=trust.keys + (own,))
    except SigningError as e:
        raise click.ClickException(str(e)) from None
    report = verify_bundle(path, trust)
    m = report.manifest or {}
    for w in report.warnings:
        _log(f"warning: {w}")
    if not report.ok:
        raise click.ClickException(f"bundle {path} failed verification:\n  - " + "\n  - ".join(report.errors))
    gate = m.get("gate", {})
    sig = report.signature
    signed = f"signed by {sig.key_id}" if sig is not None and sig.valid else "UNSIGNED (run `build-model sign`)"
    click.echo(f"{path}: OK - {m.get('model_id')}, primary {m.get('primary')}, {len(report.files)} files checksummed, "
               f"{signed}, gate {'approved' if gate.get('approved') else 'rejected'}: {gate.get('reason', 'n/a')}")


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path))
@trusted_key_option
@click.option("--require-signature/--allow-unsigned", default=False, show_default=True,
              help="fail when the manifest has no signature from a trusted key (as an agent does by default)")
def verify(bundle_dir: Path, trusted_keys: tuple[Path, ...], require_signature: bool) -> None:
    """Check a bundle: signature, manifest format, every file's sha256, labels, gate verdict."""
    _verify_or_exit(bundle_dir, trusted_keys=trusted_keys, require_signature=require_signature)


@main.command()
@click.option("--private", "private_path", type=click.Path(path_type=Path), required=True,
              help="where to write the new private key (created 0600; never overwritten; keep it off devices)")
@click.option("--public", "public_path", type=click.Path(path_type=Path), default=None,
              help="where to write the public key (default: PRIVATE with .pub); devices trust this file")
def keygen(private_path: Path, public_path: Path | None) -> None:
    """Create an Ed25519 key pair for signing bundles (a site's own key for its retrained bundles)."""
    from edge_agent.signing import SigningError, write_keypair

    public_path = public_path or private_path.with_suffix(".pub")
    try:
        kid = write_keypair(private_path, public_path)
    except (SigningError, OSError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"key {kid}: private {private_path} (0600, keep it secret and off the devices), public {public_path} "
               "(list it in the devices' trusted_keys)")


@main.command()
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path, file_okay=False), required=True,
              help="bundle folder whose manifest.json to sign")
@click.option("--key", "key_path", type=click.Path(path_type=Path), required=True,
              help="Ed25519 private key from `build-model keygen`")
def sign(bundle_dir: Path, key_path: Path) -> None:
    """Sign a bundle's manifest.json (writes manifest.sig) after checking every file against it.

    Signing vouches for the manifest, so a bundle whose files, format or fields fail verification is refused:
    fix or rebuild it first.
    """
    from edge_agent.bundle import verify_bundle
    from edge_agent.signing import SigningError, load_private_key, make_trust, sign_bundle

    try:
        key = load_private_key(key_path)
        rep = verify_bundle(bundle_dir, make_trust(allow_unsigned=True))
    except SigningError as e:
        raise click.ClickException(str(e)) from None
    problems = [e for e in rep.errors if not e.startswith("signature:")]
    if problems:
        raise click.ClickException(f"refusing to sign {bundle_dir}: it fails verification:\n  - " + "\n  - ".join(problems))
    kid = sign_bundle(bundle_dir, key)
    _log(f"signed {bundle_dir / 'manifest.json'} with {kid}")
    _verify_or_exit(bundle_dir, signing_key=key_path, require_signature=True)


@main.command("upgrade-bundle")
@click.argument("bundle_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--data", type=str, multiple=True, required=True,
              help="the bundle's training sources, NAME=PATH (repeatable): the OOD statistics are fitted on its "
                   "train split and thresholded on its validation split (split.csv in the bundle)")
@click.option("--out", type=click.Path(path_type=Path), required=True, help="new, empty bundle folder")
@signing_key_option
@click.option("--ood-quantile", type=click.FloatRange(0.5, 0.9999), default=0.98, show_default=True,
              help="share of validation images the OOD threshold leaves unflagged")
@click.option("--max-fit-images", type=click.IntRange(100, 100_000), default=4000, show_default=True,
              help="training images (random subset) the OOD statistics are fitted on")
@click.option("--threads", type=int, default=2, show_default=True)
def upgrade_bundle(bundle_dir: Path, data: tuple[str, ...], out: Path, signing_key: Path | None, ood_quantile: float,
                   max_fit_images: int, threads: int) -> None:
    """Make a format-3 copy of a bundle: the same weights, thresholds and temperature, plus the feature-map output
    and classifier weights (heatmaps in `edge-agent review`) and out-of-distribution statistics (the agent's
    `out_of_distribution` review reason). The logits are checked to be identical; the copy gets a new model_id."""
    from edge_agent.bundle import BundleError

    from .explain import ExplainError, upgrade_bundle as run

    _check_signing_key(signing_key)
    try:
        run(bundle_dir, out, list(data), signing_key, ood_quantile, max_fit_images, threads, _log)
    except (ExplainError, BundleError, ValueError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    _verify_or_exit(out, signing_key=signing_key)


@main.command()
@click.option("--bundle", "bundle_dir", type=click.Path(path_type=Path), default=None,
              help="bundle folder (default: the agent's bundled model)")
@click.option("--data", type=str, multiple=True, required=True,
              help="labelled images in any supported layout, NAME=PATH or PATH; repeat for several sources")
@click.option("--label-map", "label_map", multiple=True, help="SOURCE:FROM=TO[,FROM=TO] (repeatable)")
@click.option("--split", "split_csv", type=click.Path(path_type=Path, exists=True), default=None,
              help="a split.csv (e.g. the bundle's) to score only the images of --subset")
@click.option("--subset", default=None, help="with --split: train, val, test or holdout")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="folder for evaluation.md, evaluation.json and one PNG per source (ROC and reliability)")
@click.option("--threads", type=int, default=2, show_default=True)
@click.option("--bootstrap", "reps", type=int, default=1000, show_default=True, help="bootstrap resamples for the 95% intervals")
def evaluate(bundle_dir: Path | None, data: tuple[str, ...], label_map: tuple[str, ...], split_csv: Path | None,
             subset: str | None, out: Path | None, threads: int, reps: int) -> None:
    """Score a bundle as the agent runs it (its decoder, preprocessing, primary model, temperature,
    thresholds) on labelled folders, per source, each on the classes it labels."""
    from edge_agent.bundle import BundleError, default_bundle_path

    from .data import load_sources, parse_label_maps
    from .evaluate import evaluate_bundle, plot, render_markdown

    if (split_csv is None) != (subset is None):
        raise click.UsageError("--split and --subset go together (e.g. --split BUNDLE/split.csv --subset test)")
    try:
        parse_label_maps(label_map)
        specs = list(data)
        if label_map:  # validate the mapping (and name the culprit) before any image is decoded
            load_sources(specs, parse_label_maps(label_map))
        res = evaluate_bundle(bundle_dir or default_bundle_path(), specs, split_csv, subset, threads, reps, log=_log,
                              label_maps=parse_label_maps(label_map))
    except (ValueError, FileNotFoundError, BundleError) as e:
        raise click.ClickException(str(e)) from None
    md = render_markdown(res)
    click.echo(md)
    if out:
        import json as _json

        out.mkdir(parents=True, exist_ok=True)
        (out / "evaluation.md").write_text(md)
        (out / "evaluation.json").write_text(_json.dumps(res, indent=1, default=float))
        try:
            for p in plot(res, out):
                _log(f"wrote {p}")
        except ModuleNotFoundError as e:  # plots are extra: the numbers above are the result
            if e.name is None or e.name.split(".")[0] != "matplotlib":
                raise
            _log("warning: no ROC/reliability PNGs: matplotlib is not installed (pip install matplotlib)")
        _log(f"wrote {out / 'evaluation.md'} and {out / 'evaluation.json'}")


@main.command()
@click.argument("bundle_dir", type=click.Path(path_type=Path, exists=True))
@click.option("--iterations", type=int, default=100, show_default=True)
@click.option("--warmup", type=int, default=10, show_default=True)
@click.option("--threads", type=int, default=None, help="intra-op threads (default: all cores)")
@click.option("--images", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None, help="real images to feed (default: examples/images)")
@click.option("--checkpoint", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None, help="best.pt for PyTorch eager (default: same architecture, untrained weights - speed does not depend on weight values)")
@click.option("--json", "as_json", is_flag=True, help="print JSON instead of the table")
def bench(bundle_dir: Path, iterations: int, warmup: int, threads: int | None, images: Path | None,
          checkpoint: Path | None, as_json: bool) -> None:
    """Model-level benchmark: PyTorch FP32 eager vs ORT FP32 vs ORT INT8 at batch 1 and 8."""
    from edge_agent.benchstats import dumps

    from .bench import render, run

    result = run(bundle_dir, iterations, warmup, threads, images=images, checkpoint=checkpoint)
    click.echo(dumps(result) if as_json else render(result))


if __name__ == "__main__":
    main()
