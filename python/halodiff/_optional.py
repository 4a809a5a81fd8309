"""Optional dependencies: which features need which package, and one clear error when one is missing.

`import halodiff` needs only torch, numpy and tqdm (setup.py's install_requires): the ops, `patch`/`enable_cache`
on a model object and `halodiff info` work without the packages below. Features that need one import it lazily
through :func:`require`, which raises :class:`MissingDependencyError` naming the pip command.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from .errors import MissingDependencyError


@dataclass(frozen=True)
class OptionalPackage:
    module: str  # the import name
    dist: str  # the distribution pip installs
    extra: str  # the halodiff extra that brings it: pip install "halodiff[extra]"
    features: tuple[str, ...]


OPTIONAL: dict[str, OptionalPackage] = {p.module: p for p in (
    OptionalPackage("diffusers", "diffusers", "diffusers",
                    ("StreamDiffusion", "the shipped digits models", "halodiff demo / stream / bench e2e",
                     "the pipelines halodiff patches")),
    OptionalPackage("transformers", "transformers", "diffusers",
                    ("text encoders of pretrained Stable Diffusion / SD3 / Flux pipelines (loaded by diffusers)",)),
    OptionalPackage("PIL", "pillow", "demo", ("PIL frames in StreamDiffusion (to_pil)", "halodiff stream --input")),
    OptionalPackage("sklearn", "scikit-learn", "demo",
                    ("the digits dataset and classifier (halodiff demo / stream, models.DigitClassifier)",)),
    OptionalPackage("matplotlib", "matplotlib", "demo", ("the plots and image grids of halodiff demo / stream",)),
)}


def available(module: str) -> bool:
    """Whether `module` can be found on sys.path (cheap: nothing is imported)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, feature: str) -> ModuleType:
    """Import and return `module` (a package of OPTIONAL or one of its submodules, e.g. "PIL.Image") or raise
    MissingDependencyError naming the pip command."""
    top = module.split(".")[0]
    pkg = OPTIONAL[top]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name is not None and exc.name.split(".")[0] != top:
            raise  # the package is there but one of its own dependencies is missing: show that one
        raise MissingDependencyError(
            f"{feature} needs {pkg.dist}, which is not installed: pip install {pkg.dist} "
            f"(or pip install \"halodiff[{pkg.extra}]\")") from exc


def require_all(modules: tuple[str, ...], feature: str) -> None:
    """Raise one MissingDependencyError listing every package of `modules` that is missing (nothing is imported):
    for commands that would otherwise fail late, e.g. in a spawned rank."""
    missing = [OPTIONAL[m] for m in modules if not available(m)]
    if missing:
        names = [p.dist for p in missing]
        extra = "demo" if any(p.extra == "demo" for p in missing) else "diffusers"
        raise MissingDependencyError(f"{feature} needs {', '.join(names)}, not installed: pip install "
                                     f"{' '.join(names)} (or pip install \"halodiff[{extra}]\")")


def report() -> dict[str, dict[str, Any]]:
    """For `halodiff info`: each optional package, whether it is importable, its version and what needs it."""
    out = {}
    for module, pkg in OPTIONAL.items():
        ok = available(module)
        try:
            version = importlib.metadata.version(pkg.dist) if ok else None
        except importlib.metadata.PackageNotFoundError:
            version = None
        out[module] = {"available": ok, "version": version, "pip": pkg.dist, "extra": pkg.extra,
                       "needed_by": list(pkg.features)}
    return out
