"""Optional dependencies: which extra brings what, and a clear error when one is missing.

``pip install rcfast`` gives the loss alone (torch only). Everything else is an
extra declared in pyproject.toml; a feature that needs one calls :func:`require`
*before* it starts any long work, so a user learns which extra to install in
the first second of a command, not after minutes of training.
"""
from __future__ import annotations

import importlib.util

__all__ = ["EXTRA_MODULES", "MissingExtraError", "missing_modules", "require"]

# import name -> (distribution name, extra that installs it)
EXTRA_MODULES = {
    "numpy": ("numpy", "train"),
    "yaml": ("PyYAML", "train"),
    "tqdm": ("tqdm", "train"),
    "sklearn": ("scikit-learn", "train"),
    "matplotlib": ("matplotlib", "train"),
    "fontTools": ("fonttools", "train"),
    "PIL": ("pillow", "data"),
    "simplejpeg": ("simplejpeg", "data"),
    "threadpoolctl": ("threadpoolctl", "data"),
    "nvidia.dali": ("nvidia-dali-cuda120", "data"),
    "ot": ("POT", "ot"),
    "triton": ("triton", "triton"),
}


class MissingExtraError(ImportError):
    """A feature needs an optional dependency that is not installed."""


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken __spec__
        return False


def missing_modules(*modules: str) -> list[str]:
    """The import names among ``modules`` that cannot be imported here."""
    return [m for m in modules if not _importable(m)]


def require(feature: str, *modules: str) -> None:
    """Raise :class:`MissingExtraError` naming the extra(s) if any of ``modules`` is missing.

    ``feature`` says what needs them, e.g. ``"rcfast demo"``.
    """
    missing = missing_modules(*modules)
    if not missing:
        return
    extras = sorted({EXTRA_MODULES[m][1] for m in missing if m in EXTRA_MODULES})
    packages = ", ".join(EXTRA_MODULES.get(m, (m,))[0] for m in missing)
    hint = f"pip install 'rcfast[{','.join(extras)}]'" if extras else f"pip install {packages}"
    raise MissingExtraError(f"{feature} needs {packages}, which is not installed: {hint}")
