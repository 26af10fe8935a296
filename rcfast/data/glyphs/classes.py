"""Choosing classes: scripts and their counts, and disjoint random subsets of a script's classes.

`split_classes(scripts, sizes, seed)` cuts one seeded permutation of the
scripts' classes into consecutive disjoint parts, so the first part is the
same whatever parts follow it: `split_classes("Georgian", [60], s)[0]` and
`split_classes("Georgian", [60, 40], s)[0]` are the same 60 classes, and the
40 of the second call are the held-out "future" classes no model trains on.
`glyph_dataset(scripts=..., classes_per_script=n, class_seed=s)` takes the
first part of exactly that permutation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from .catalog import GlyphCatalog, load_catalog


def _describe(catalog: GlyphCatalog) -> str:
    return ", ".join(f"{name} ({count})" for name, count in catalog.counts().items())


def resolve_script(catalog: GlyphCatalog, script) -> str:
    """The catalogue's name for `script` (case, '_' and '-' ignored), or ValueError listing the scripts."""
    if not isinstance(script, str):
        raise TypeError(f"a script name must be a string, got {script!r}")
    wanted = script.strip().lower().replace("_", " ").replace("-", " ")
    for name in catalog.counts():
        if name.lower() == wanted:
            return name
    raise ValueError(f"script {script!r} is not available with these fonts; available scripts "
                     f"(classes): {_describe(catalog)}")


def resolve_scripts(catalog: GlyphCatalog, scripts) -> list[str]:
    """A script name or a list of them, as the catalogue's names (each checked, none twice)."""
    if isinstance(scripts, str):
        scripts = [scripts]
    if not isinstance(scripts, Sequence) or not scripts:
        raise TypeError(f"scripts must be a script name or a non-empty list of them, got {scripts!r}")
    names = [resolve_script(catalog, s) for s in scripts]
    if len(set(names)) != len(names):
        raise ValueError(f"scripts lists a script twice: {scripts!r}")
    return names


def available_scripts(fonts="matplotlib", precomposed: bool = True, num_workers: int | None = None) -> dict[str, int]:
    """Each script the fonts really draw, with its number of classes, most classes first."""
    return load_catalog(fonts, precomposed, num_workers).counts()


def script_classes(script: str, fonts="matplotlib", precomposed: bool = True) -> list[str]:
    """A script's class ids ('U+0041', ...) in code point order."""
    catalog = load_catalog(fonts, precomposed)
    return list(catalog.scripts()[resolve_script(catalog, script)])


def _check_sizes(sizes) -> list[int]:
    if isinstance(sizes, (int, np.integer)) and not isinstance(sizes, bool):
        sizes = [sizes]
    if not isinstance(sizes, Sequence) or not sizes:
        raise TypeError(f"sizes must be a positive integer or a non-empty list of them, got {sizes!r}")
    for n in sizes:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"sizes must be positive integers, got {sizes!r}")
    return [int(n) for n in sizes]


def split_classes(scripts, sizes, seed: int = 0, exclude=(), fonts="matplotlib",
                  precomposed: bool = True) -> list[list[str]]:
    """Disjoint random subsets of the classes of one script or several (pooled).

    Args:
        scripts: a script name or a list of them (their classes are pooled).
        sizes: the number of classes of each part, e.g. `[300, 50]`.
        seed: the permutation's seed (a non-negative integer).
        exclude: class ids left out of the pool (e.g. classes another part of
            an experiment already uses).

    Returns one list of class ids per size (each in code point order); raises
    ValueError, listing every script with its class count, when the pool is
    smaller than `sum(sizes)`.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    sizes = _check_sizes(sizes)
    catalog = load_catalog(fonts, precomposed)
    names = resolve_scripts(catalog, scripts)
    excluded = set(exclude)
    by_script = catalog.scripts()
    pool = sorted((cid for name in names for cid in by_script[name] if cid not in excluded),
                  key=lambda cid: catalog.classes[cid].codepoint)
    if sum(sizes) > len(pool):
        left_out = f" after excluding {len(excluded)} class(es)" if excluded else ""
        raise ValueError(f"scripts {names} have {len(pool)} classes{left_out}, fewer than the "
                         f"{sum(sizes)} asked (sizes {sizes}); available scripts (classes): {_describe(catalog)}")
    order = np.random.default_rng(int(seed)).permutation(len(pool))
    parts, start = [], 0
    for n in sizes:
        chosen = [pool[i] for i in order[start:start + n]]
        parts.append(sorted(chosen, key=lambda cid: catalog.classes[cid].codepoint))
        start += n
    return parts


def classes_of_scripts(catalog: GlyphCatalog, scripts, classes_per_script, seed: int,
                       fonts, precomposed: bool) -> list[str]:
    """`classes_per_script` (int, {script: int} or None for all) classes of each script."""
    names = resolve_scripts(catalog, scripts)
    if classes_per_script is None:
        counts = {name: None for name in names}
    elif isinstance(classes_per_script, Mapping):
        counts = {resolve_script(catalog, k): v for k, v in classes_per_script.items()}
        missing = [n for n in names if n not in counts] + [n for n in counts if n not in names]
        if missing:
            raise ValueError(f"classes_per_script must give a count for exactly the scripts {names}, "
                             f"got {dict(classes_per_script)!r}")
    else:
        counts = {name: classes_per_script for name in names}
    chosen = []
    for name in names:
        n = counts[name]
        if n is None:
            chosen += catalog.scripts()[name]
        else:
            chosen += split_classes(name, n, seed, fonts=fonts, precomposed=precomposed)[0]
    return chosen
