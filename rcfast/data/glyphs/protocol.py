"""The glyph transfer protocol's data: which classes play which role, and the data sets that hold them.

The paper's protocol (representation consolidation, arXiv 2107.08039) on
glyphs, per seed:

- a *general domain* (several scripts pooled, e.g. Latin + Greek + Cyrillic):
  `general_classes` classes to train the generalist teacher on (the stand-in
  for ImageNet) and `general_future_classes` other classes held out;
- *specialist scripts* (e.g. Georgian, Arabic): `specialist_classes` classes
  each for a specialist teacher, and `specialist_future_classes` held out --
  the expert's "future tasks";
- an *unused script* that no model and no proxy image ever shows;
- *proxy images*: unlabeled, other images of the specialists' training
  classes (no held-out class, no image of any labeled split): the experts'
  task data without their labels, which the paper distils on. The general
  domain's images are not replayed (the paper does not replay ImageNet): the
  generalist head is distilled on the experts' images too.

Every part is a disjoint piece of one seeded permutation of its scripts'
classes (`split_classes`), so held-out classes never reach a teacher or the
proxy set. `choose_classes(protocol, seed)` makes the choice (and raises the
glyph module's ValueError, listing every script with its class count, for an
unknown script or too few classes); `protocol_data(root, protocol, seed)`
renders the data sets, once, under `root`:

```
root/general/{train,test}/U+XXXX/*.png          the generalist's labeled task
root/<script>/{train,test}/U+XXXX/*.png         each specialist's labeled task ("georgian", ...)
root/proxy/proxy/*.png                          unlabeled proxy images (classes hidden)
root/future_general/{train,test}/...            downstream tasks: held-out general classes,
root/future_<script>/{train,test}/...           held-out classes of each specialist script,
root/unused_<script>/{train,test}/...           and classes of the unused script
```

A downstream task's `train` split holds `probe_train_images` images per class
(images 0, 1, ...: the n-shot set is the first n of them) and `test` the next
`probe_test_images`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from .catalog import load_catalog
from .classes import resolve_script, resolve_scripts, split_classes
from .dataset import GlyphDataset, glyph_dataset

__all__ = ["GlyphProtocol", "ProtocolClasses", "ProtocolData", "choose_classes", "protocol_data", "script_slug"]

PROXY_START = 1000  # proxy images are image indices from here on: no overlap with any labeled split


def script_slug(script: str) -> str:
    """A script's folder/task name: 'Canadian Aboriginal' -> 'canadian_aboriginal'."""
    return script.strip().lower().replace(" ", "_").replace("-", "_")


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class GlyphProtocol:
    """Which scripts play which role, how many classes each part has, how many images each split has."""

    general_scripts: tuple[str, ...] = ("Latin", "Greek", "Cyrillic")
    general_classes: int = 300
    general_future_classes: int = 100
    specialist_scripts: tuple[str, ...] = ("Georgian", "Arabic")
    specialist_classes: int = 70
    specialist_future_classes: int = 45
    unused_script: str = "Canadian Aboriginal"
    unused_classes: int = 100
    teacher_train_images: int = 40    # labeled images per class of a teacher's task
    teacher_test_images: int = 10     # its test split (the teachers' own accuracy)
    proxy_images: int = 40            # unlabeled proxy images per specialist class
    probe_train_images: int = 20      # downstream train split per class (the largest n-shot set)
    probe_test_images: int = 20       # downstream test split per class
    image_size: int = 32

    def __post_init__(self):
        for name in ("general_scripts", "specialist_scripts"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(s, str) and s for s in value) or not value:
                raise ValueError(f"{name} must be a non-empty list of script names, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        if not isinstance(self.unused_script, str) or not self.unused_script:
            raise ValueError(f"unused_script must be a script name, got {self.unused_script!r}")
        if len(self.specialist_scripts) < 2:
            raise ValueError(f"specialist_scripts: the protocol needs at least 2 specialist scripts, "
                             f"got {list(self.specialist_scripts)}")
        for f in dataclasses.fields(self):
            if f.type == "int":
                _positive(f.name, getattr(self, f.name))

    def as_dict(self) -> dict:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}

    def resolve(self, fonts="matplotlib") -> "GlyphProtocol":
        """This protocol with the catalogue's script names ('georgian' -> 'Georgian').

        Raises ValueError, listing the available scripts with their class
        counts, for an unknown script, and for a script given two roles.
        """
        catalog = load_catalog(fonts)
        general = resolve_scripts(catalog, list(self.general_scripts))
        specialists = resolve_scripts(catalog, list(self.specialist_scripts))
        unused = resolve_script(catalog, self.unused_script)
        roles = [(s, "general") for s in general] + [(s, "specialist") for s in specialists] + [(unused, "unused")]
        seen: dict[str, str] = {}
        for script, role in roles:
            if script in seen:
                raise ValueError(f"script {script!r} has two roles ({seen[script]} and {role}); "
                                 "each script plays one role")
            seen[script] = role
        return dataclasses.replace(self, general_scripts=tuple(general), specialist_scripts=tuple(specialists),
                                   unused_script=unused)


@dataclass
class ProtocolClasses:
    """The class ids of each role for one seed (disjoint)."""

    general: list[str]
    general_future: list[str]
    specialists: dict[str, list[str]]          # script -> the specialist's training classes
    specialist_futures: dict[str, list[str]]   # script -> its held-out classes
    unused: list[str]


def choose_classes(protocol: GlyphProtocol, seed: int, fonts="matplotlib") -> ProtocolClasses:
    """Each role's classes for ``seed``; ValueError (listing scripts and counts) if a script lacks classes."""
    protocol = protocol.resolve(fonts)
    general, general_future = split_classes(list(protocol.general_scripts),
                                            [protocol.general_classes, protocol.general_future_classes],
                                            seed, fonts=fonts)
    specialists, futures = {}, {}
    for script in protocol.specialist_scripts:
        train, future = split_classes(script, [protocol.specialist_classes, protocol.specialist_future_classes],
                                      seed, fonts=fonts)
        specialists[script], futures[script] = train, future
    unused = split_classes(protocol.unused_script, [protocol.unused_classes], seed, fonts=fonts)[0]
    return ProtocolClasses(general, general_future, specialists, futures, unused)


@dataclass
class ProtocolData:
    """The written data sets of one seed.

    ``teacher_tasks``: ``{"general": ds, "<script>": ds, ...}`` (labeled, ``train``/``test``);
    ``proxy``: unlabeled (its split ``proxy``); ``downstream``: ``{"future_general": ds,
    "future_<script>": ds, ..., "unused_<script>": ds}`` (``train``/``test``).
    """

    root: Path
    classes: ProtocolClasses
    teacher_tasks: dict[str, GlyphDataset]
    proxy: GlyphDataset
    downstream: dict[str, GlyphDataset] = field(default_factory=dict)

    @property
    def proxy_folder(self) -> str:
        return self.proxy.splits["proxy"]


def protocol_data(root, protocol: GlyphProtocol, seed: int, *, fonts="matplotlib", overwrite: bool = False,
                  num_workers: int | None = None, progress: bool = False) -> ProtocolData:
    """Render (once) the data sets of ``protocol`` for ``seed`` under ``root``; see the module docstring.

    ``seed`` chooses the classes (``choose_classes``) and seeds the rendering.
    A second call with the same arguments writes nothing.
    """
    protocol = protocol.resolve(fonts)
    classes = choose_classes(protocol, seed, fonts)
    root = Path(root)
    common = dict(seed=seed, image_size=protocol.image_size, fonts=fonts, overwrite=overwrite,
                  num_workers=num_workers, progress=progress)
    teacher_splits = {"train": protocol.teacher_train_images, "test": protocol.teacher_test_images}
    probe_splits = {"train": protocol.probe_train_images, "test": protocol.probe_test_images}

    teacher_tasks = {"general": glyph_dataset(root / "general", classes.general, splits=teacher_splits, **common)}
    for script, train in classes.specialists.items():
        teacher_tasks[script_slug(script)] = glyph_dataset(root / script_slug(script), train, splits=teacher_splits,
                                                           **common)
    specialist_classes = [c for script in classes.specialists for c in teacher_tasks[script_slug(script)].classes]
    proxy = glyph_dataset(root / "proxy", specialist_classes, labeled=False,
                          splits={"proxy": range(PROXY_START, PROXY_START + protocol.proxy_images)}, **common)
    downstream = {"future_general": glyph_dataset(root / "future_general", classes.general_future,
                                                  splits=probe_splits, **common)}
    for script, future in classes.specialist_futures.items():
        name = f"future_{script_slug(script)}"
        downstream[name] = glyph_dataset(root / name, future, splits=probe_splits, **common)
    name = f"unused_{script_slug(protocol.unused_script)}"
    downstream[name] = glyph_dataset(root / name, classes.unused, splits=probe_splits, **common)
    return ProtocolData(root, classes, teacher_tasks, proxy, downstream)

