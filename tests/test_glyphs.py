"""rcfast.data.glyphs: the glyph catalogue's rules, the renderer, and the written data set.

Most tests use a font built here with fontTools (a .notdef box, a glyph that
copies it, an empty glyph, a misnamed glyph, exact and near duplicates, and
distinct shapes), so each catalogue rule is checked on a case whose answer
is known; the real-font tests use small matplotlib fonts (Computer Modern,
DejaVu Sans).
"""

import json
import multiprocessing
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from rcfast.data import ProxyImages
from rcfast.data.glyphs import (RenderParams, available_scripts, contact_sheet, glyph_dataset, load_catalog,
                                resolve_fonts, script_classes, split_classes)
from rcfast.data.glyphs.fonts import matplotlib_font_dir
from rcfast.data.glyphs.render import GlyphRenderer, glyph_bitmap, pil_font, sample_photo_paths

# ---------------------------------------------------------------------------------------------
# A font whose every glyph has a known fate

DISTINCT_LATIN = "FGHIJKLOQRSTUVWXYZ"


def _rect(pen, x0, y0, x1, y1):
    pen.moveTo((x0, y0))
    pen.lineTo((x0, y1))
    pen.lineTo((x1, y1))
    pen.lineTo((x1, y0))
    pen.closePath()


def _triangle(pen, dx=0):
    pen.moveTo((50 + dx, 0))
    pen.lineTo((300 + dx, 700))
    pen.lineTo((550 + dx, 0))
    pen.closePath()


def _box(pen):  # the .notdef "tofu" box: a frame
    _rect(pen, 50, 0, 550, 700)
    pen.moveTo((100, 50))
    pen.lineTo((500, 50))
    pen.lineTo((500, 650))
    pen.lineTo((100, 650))
    pen.closePath()


def build_test_font(path: Path) -> Path:
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    drawings = {
        ".notdef": _box,
        "A": _triangle,                                   # U+0041
        "Alpha": _triangle,                               # U+0391: the same outline, as in DejaVu
        "uni0410": _triangle,                             # U+0410 (Cyrillic A): the same again
        "B": _box,                                        # U+0042: a copy of .notdef
        "C": lambda pen: None,                            # U+0043: no ink
        "D": _triangle,                                   # U+0044: an identical copy of A
        "omega": lambda pen: _rect(pen, 100, 0, 500, 300),  # U+0045: its name says another character
        "turnstileright": lambda pen: _rect(pen, 100, 0, 200, 300),  # U+0050: a TeX name, no AGL one
        "M": lambda pen: _triangle(pen, dx=2),            # U+004D: A moved by 2/1000 em
        "N": lambda pen: (_triangle(pen), _rect(pen, 250, 780, 350, 880)),  # U+004E: A with a dot
        "beta": lambda pen: (_rect(pen, 100, -200, 200, 700), _rect(pen, 200, 350, 450, 700)),
        "uni0416": lambda pen: (_rect(pen, 270, 0, 330, 700), _rect(pen, 50, 320, 550, 380)),
    }
    for k, letter in enumerate(DISTINCT_LATIN):
        drawings[letter] = (lambda pen, k=k: (_rect(pen, 60 + 90 * (k % 5), 0, 140 + 90 * (k % 5), 700),
                                                      _rect(pen, 50, 60 + 160 * (k // 5), 550, 130 + 160 * (k // 5))))
    cmap = {0x41: "A", 0x391: "Alpha", 0x410: "uni0410", 0x42: "B", 0x43: "C", 0x44: "D", 0x45: "omega",
            0x50: "turnstileright", 0x4D: "M", 0x4E: "N", 0x3B2: "beta", 0x416: "uni0416"}
    cmap.update({ord(letter): letter for letter in DISTINCT_LATIN})
    builder = FontBuilder(1000, isTTF=True)
    builder.setupGlyphOrder(list(drawings))
    builder.setupCharacterMap(cmap)
    glyphs = {}
    for name, draw in drawings.items():
        pen = TTGlyphPen(None)
        draw(pen)
        glyphs[name] = pen.glyph()
    builder.setupGlyf(glyphs)
    glyf = builder.font["glyf"]
    builder.setupHorizontalMetrics({name: (600, getattr(glyf[name], "xMin", 0)) for name in drawings})
    builder.setupHorizontalHeader(ascent=900, descent=-250)
    builder.setupNameTable({"familyName": "RcfastGlyphTest", "styleName": "Regular"})
    builder.setupOS2(sTypoAscender=900, sTypoDescender=-250, usWinAscent=900, usWinDescent=250)
    builder.setupPost()
    builder.save(str(path))
    return path


@pytest.fixture(scope="module")
def test_font(tmp_path_factory):
    return str(build_test_font(tmp_path_factory.mktemp("font") / "RcfastGlyphTest.ttf"))


@pytest.fixture(scope="module")
def cm_fonts():
    folder = matplotlib_font_dir()
    return [str(folder / name) for name in ("cmr10.ttf", "cmti10.ttf", "cmss10.ttf", "cmsy10.ttf", "cmex10.ttf")]


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(Path(root).rglob("*.png"))}


# ---------------------------------------------------------------------------------------------
# The catalogue


def test_catalog_keeps_real_glyphs_and_rejects_tofu_blank_and_misnamed(test_font):
    catalog = load_catalog(test_font)
    ids = set(catalog.classes)
    assert {"U+0041", "U+004E", "U+03B2", "U+0416"} <= ids
    assert {f"U+{ord(c):04X}" for c in DISTINCT_LATIN} <= ids
    assert not {"U+0042", "U+0043", "U+0045", "U+0050"} & ids
    assert catalog.rejected["RcfastGlyphTest"] == {"misnamed": 2, "blank": 1, "notdef": 1}
    assert catalog.counts() == {"Latin": 2 + len(DISTINCT_LATIN), "Cyrillic": 1, "Greek": 1}
    assert catalog.classes["U+0416"].script == "Cyrillic" and catalog.classes["U+03B2"].script == "Greek"


def test_identical_renderings_are_dropped_in_favour_of_the_lowest_code_point(test_font):
    catalog = load_catalog(test_font)
    # Identical outlines (Greek Alpha, Cyrillic A, D) and one moved by 2/1000
    # em (M) all render like Latin A: dropped, A kept.
    assert catalog.dropped == {"U+0044": "U+0041", "U+004D": "U+0041", "U+0391": "U+0041", "U+0410": "U+0041"}
    # A with a dot differs by far more than the tolerance: a class of its own.
    assert "U+004E" in catalog.classes
    # Every kept pair really renders differently (the rule holds on the output).
    font = pil_font(test_font, 64)
    bitmaps = {cid: glyph_bitmap(font, cls.char) for cid, cls in catalog.classes.items()}
    for a in bitmaps:
        for b in bitmaps:
            if a < b and bitmaps[a].bitmap.shape == bitmaps[b].bitmap.shape:
                assert not np.array_equal(bitmaps[a].bitmap, bitmaps[b].bitmap), (a, b)


def test_cmap_coverage_and_glyph_names_on_computer_modern(cm_fonts):
    from fontTools.ttLib import TTFont

    catalog = load_catalog(cm_fonts)
    keys = {f.key for f in catalog.fonts}
    assert keys == {"cmr10", "cmti10", "cmss10", "cmsy10", "cmex10"}
    cmaps = {f.key: TTFont(f.path, lazy=True).getBestCmap() for f in catalog.fonts}
    for cls in catalog.classes.values():
        assert cls.fonts, cls.id
        assert all(cls.codepoint in cmaps[key] for key in cls.fonts), cls.id
    # cmsy10 maps 'A'-'Z' to calligraphic capitals (kept) but 'a' to a turnstile
    # and cmex10 maps letters to big delimiters: neither is drawn for those letters.
    assert "cmsy10" in catalog.classes["U+0041"].fonts
    assert "cmsy10" not in catalog.classes["U+0061"].fonts
    assert all("cmex10" not in cls.fonts for cls in catalog.classes.values())
    assert catalog.rejected["cmsy10"]["misnamed"] > 0
    assert set(catalog.counts()) == {"Latin"} and catalog.counts()["Latin"] >= 50


def test_no_class_renders_blank_or_as_its_fonts_notdef(cm_fonts):
    catalog = load_catalog(cm_fonts)
    paths = {f.key: f.path for f in catalog.fonts}
    for cls in list(catalog.classes.values()):
        for key in cls.fonts:
            font = pil_font(paths[key], 40)
            # Drawn here through the default layout path, independently of the catalogue's.
            box = font.getbbox(cls.char)
            image = Image.new("L", (box[2] + 4, box[3] + 4))
            ImageDraw.Draw(image).text((2, 2), cls.char, font=font, fill=255)
            notdef = Image.new("L", image.size)
            ImageDraw.Draw(notdef).text((2, 2), "\U0010fffd", font=font, fill=255)
            ink = np.asarray(image)
            assert ink.max() > 0, (cls.id, key)
            assert not np.array_equal(ink, np.asarray(notdef)), (cls.id, key)


@pytest.mark.slow
def test_dejavu_sans_covers_many_scripts_and_drops_cross_script_twins():
    catalog = load_catalog(str(matplotlib_font_dir() / "DejaVuSans.ttf"))
    counts = catalog.counts()
    for script, at_least in {"Latin": 400, "Canadian Aboriginal": 300, "Braille": 250, "Cyrillic": 150,
                             "Arabic": 100, "Georgian": 80, "Armenian": 50, "Hebrew": 25, "Tifinagh": 30,
                             "Nko": 20, "Ogham": 20}.items():
        assert counts.get(script, 0) >= at_least, (script, counts)
    # Latin A, Greek Alpha and Cyrillic A share an outline: only Latin A stays.
    assert "U+0041" in catalog.classes
    assert catalog.dropped["U+0391"] == "U+0041" and catalog.dropped["U+0410"] == "U+0041"
    # Letters only: no punctuation, digits of the Common script, marks or compatibility forms.
    assert "U+002E" not in catalog.classes and "U+0030" not in catalog.classes
    assert "U+0301" not in catalog.classes and "U+FE8D" not in catalog.classes  # acute; Arabic alef isolated
    # Braille patterns differ only by which dots are raised: all 255 inked ones are classes.
    assert counts["Braille"] == 255


def test_matplotlib_font_set_leaves_out_the_last_resort_font():
    keys = [f.key for f in resolve_fonts("matplotlib")]
    assert "DejaVuSans" in keys and "cmr10" in keys and "STIXGeneral" in keys
    assert not any(k.startswith("LastResort") for k in keys)


def test_precomposed_false_keeps_base_letters_only(cm_fonts):
    with_accents = load_catalog(cm_fonts, precomposed=True)
    base = load_catalog(cm_fonts, precomposed=False)
    assert set(base.classes) <= set(with_accents.classes)
    import unicodedata

    assert all(not unicodedata.decomposition(c.char) for c in base.classes.values())


# ---------------------------------------------------------------------------------------------
# Choosing classes


def test_split_classes_is_disjoint_nested_and_seeded(test_font):
    a, b = split_classes("Latin", [8, 5], seed=3, fonts=test_font)
    assert len(a) == 8 and len(b) == 5 and not set(a) & set(b)
    assert split_classes("latin", [8], seed=3, fonts=test_font)[0] == a  # the first part does not depend on later ones
    assert split_classes("Latin", [8, 5], seed=3, fonts=test_font) == [a, b]
    assert split_classes("Latin", [8], seed=4, fonts=test_font)[0] != a
    rest = split_classes("Latin", [20 - 8], seed=0, exclude=a, fonts=test_font)[0]
    assert not set(rest) & set(a) and len(rest) == 12
    pooled = split_classes(["Latin", "Greek", "Cyrillic"], [22], seed=0, fonts=test_font)[0]
    assert set(pooled) == set(load_catalog(test_font).classes)


def test_unknown_script_or_too_few_classes_lists_the_available_scripts(test_font):
    with pytest.raises(ValueError, match=r"Klingon.*Latin \(20\).*Cyrillic \(1\)"):
        split_classes("Klingon", [1], fonts=test_font)
    with pytest.raises(ValueError, match=r"fewer than the 30 asked.*Latin \(20\)"):
        split_classes("Latin", [20, 10], fonts=test_font)
    with pytest.raises(ValueError, match="Klingon"):
        glyph_dataset("unused", scripts=["Klingon"], fonts=test_font)
    with pytest.raises(ValueError, match=r"Greek \(1\)"):
        glyph_dataset("unused", scripts="Greek", classes_per_script=2, fonts=test_font)
    with pytest.raises(ValueError, match="sizes"):
        split_classes("Latin", [0], fonts=test_font)
    assert available_scripts(test_font) == {"Latin": 20, "Cyrillic": 1, "Greek": 1}
    assert script_classes("Greek", test_font) == ["U+03B2"]


def test_unreadable_font_is_skipped_with_a_warning_naming_it(tmp_path, test_font):
    broken = tmp_path / "Broken.ttf"
    broken.write_bytes(b"this is not a font" * 100)
    with pytest.warns(RuntimeWarning, match="Broken.ttf"):
        fonts = resolve_fonts([str(broken), test_font])
    assert [f.key for f in fonts] == ["RcfastGlyphTest"]
    with pytest.warns(RuntimeWarning, match="Broken.ttf"), pytest.raises(ValueError, match="no readable font"):
        resolve_fonts([str(broken)])
    with pytest.raises(FileNotFoundError, match="missing.ttf"):
        resolve_fonts([str(tmp_path / "missing.ttf")])


# ---------------------------------------------------------------------------------------------
# Rendering


def test_every_image_shows_its_whole_glyph_legibly(cm_fonts):
    catalog = load_catalog(cm_fonts)
    renderer = GlyphRenderer({f.key: f.path for f in catalog.fonts}, RenderParams())
    for cls in list(catalog.classes.values())[:40]:
        for index in range(5):
            image, coverage = renderer.render_with_coverage(7, cls.codepoint, index, list(cls.fonts))
            assert image.shape == (32, 32, 3) and image.dtype == np.uint8
            assert coverage.max() > 0.5, cls.id  # ink, not a blank image
            border = np.concatenate([coverage[0], coverage[-1], coverage[:, 0], coverage[:, -1]])
            assert border.max() < 0.05, cls.id  # shrunk to fit, never cut off
            luminance = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114]) / 255
            ink, ground = luminance[coverage > 0.7], luminance[coverage == 0]
            if ink.size >= 3:  # thin glyphs may have few fully covered pixels
                assert abs(ink.mean() - ground.mean()) > 0.2, cls.id


def test_images_are_a_pure_function_of_seed_class_and_index(test_font):
    catalog = load_catalog(test_font)
    renderer = GlyphRenderer({f.key: f.path for f in catalog.fonts}, RenderParams())
    other = GlyphRenderer({f.key: f.path for f in catalog.fonts}, RenderParams())
    fonts = list(catalog.classes["U+0041"].fonts)
    first = renderer.render(5, 0x41, 3, fonts)
    renderer.render(5, 0x46, 0, fonts)  # rendering something else in between changes nothing
    assert np.array_equal(first, renderer.render(5, 0x41, 3, fonts))
    assert np.array_equal(first, other.render(5, 0x41, 3, fonts))
    assert not np.array_equal(first, renderer.render(6, 0x41, 3, fonts))
    assert not np.array_equal(first, renderer.render(5, 0x41, 4, fonts))


@pytest.mark.slow  # importing scikit-learn takes seconds
def test_sample_photographs_are_scikit_learns():
    from sklearn.datasets import load_sample_images

    ours = [np.asarray(Image.open(p)) for p in sample_photo_paths()]
    theirs = load_sample_images().images
    assert len(ours) == len(theirs) == 2
    assert all(np.array_equal(a, b) for a, b in zip(ours, theirs))


def test_render_params_reject_bad_values():
    with pytest.raises(ValueError, match="image_size"):
        RenderParams(image_size=4)
    with pytest.raises(ValueError, match="min_contrast"):
        RenderParams(min_contrast=0.8)
    with pytest.raises(ValueError, match="p_blur"):
        RenderParams(p_blur=1.5)


# ---------------------------------------------------------------------------------------------
# The written data set


def test_same_seed_writes_byte_identical_files_another_seed_other_files(tmp_path, test_font):
    kwargs = dict(classes=["U+0041", "U+0046", "U+0416"], splits={"train": 3, "test": 2}, fonts=test_font)
    a = glyph_dataset(tmp_path / "a", seed=1, **kwargs)
    b = glyph_dataset(tmp_path / "b", seed=1, **kwargs)
    c = glyph_dataset(tmp_path / "c", seed=2, **kwargs)
    files_a, files_b, files_c = _files(a.root), _files(b.root), _files(c.root)
    assert len(files_a) == 15 and files_a == files_b
    assert files_a.keys() == files_c.keys()
    assert all(files_a[k] != files_c[k] for k in files_a)
    # A split is a range of image indices: image 2 of a class is the same file wherever it lies.
    d = glyph_dataset(tmp_path / "d", seed=1, classes=kwargs["classes"], splits={"other": range(2, 4)},
                      fonts=test_font)
    assert _files(d.root)["other/U+0041/00002.png"] == files_a["train/U+0041/00002.png"]
    assert _files(d.root)["other/U+0041/00003.png"] == files_a["test/U+0041/00003.png"]


def test_manifest_counts_and_proxy_images_reads_the_tree(tmp_path, test_font):
    ds = glyph_dataset(tmp_path / "set", scripts=["Latin", "Cyrillic"], classes_per_script={"Latin": 4, "Cyrillic": 1},
                       class_seed=0, splits={"train": 4, "test": 2}, seed=0, image_size=24, fonts=test_font)
    manifest = json.loads((ds.root / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["num_images"] == {"train": 20, "test": 10} == ds.num_images
    assert manifest["images_per_class"] == {"train": 4, "test": 2}
    assert [c["id"] for c in manifest["classes"]] == ds.classes == sorted(ds.classes)
    chosen = split_classes("Latin", [4], seed=0, fonts=test_font)[0] + split_classes("Cyrillic", [1], fonts=test_font)[0]
    assert ds.classes == sorted(chosen)
    assert {c["script"] for c in manifest["classes"]} == {"Latin", "Cyrillic"}
    assert manifest["software"]["freetype"] and manifest["fonts"][0]["sha256"]
    for split, n in ds.num_images.items():
        class_dirs = sorted(p.name for p in Path(ds.splits[split]).iterdir())
        assert class_dirs == ds.classes
        assert sum(len(list(Path(ds.splits[split], d).glob("*.png"))) for d in class_dirs) == n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # DALI may be missing here: the PIL backend says so
        loader = ProxyImages(ds.splits["train"], image_size=24, batch_size=8, device="cpu", augment=None,
                             labels=True, backend="pil", num_threads=0, shuffle=False)
        batches = list(loader)
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    assert images.shape == (20, 3, 24, 24)
    arrays, array_labels = ds.arrays("train")
    assert arrays.shape == (20, 24, 24, 3)
    assert labels.tolist() == array_labels.tolist() == sorted(array_labels.tolist())
    assert np.bincount(array_labels).tolist() == [4] * 5


def test_unlabeled_split_is_one_flat_folder_without_class_names(tmp_path, test_font):
    ds = glyph_dataset(tmp_path / "proxy", classes=["U+0041", "U+0046"], splits={"proxy": range(100, 105)},
                       labeled=False, fonts=test_font)
    names = sorted(p.name for p in Path(ds.splits["proxy"]).iterdir())
    assert names == [f"{k:06d}.png" for k in range(10)]
    images, labels = ds.arrays("proxy")
    assert images.shape == (10, 32, 32, 3) and labels is None
    labeled = glyph_dataset(tmp_path / "labeled", classes=["U+0041", "U+0046"], splits={"proxy": range(100, 105)},
                            fonts=test_font)
    # The same images, only named differently.
    assert sorted(_files(ds.root).values()) == sorted(_files(labeled.root).values())


def test_second_call_returns_the_manifest_and_writes_nothing(tmp_path, test_font):
    kwargs = dict(classes=["U+0041", "U+0046"], splits={"train": 2}, fonts=test_font)
    first = glyph_dataset(tmp_path / "set", **kwargs)
    stamps = {p: p.stat().st_mtime_ns for p in first.root.rglob("*")}
    second = glyph_dataset(tmp_path / "set", **kwargs)
    assert second.manifest == first.manifest
    assert {p: p.stat().st_mtime_ns for p in first.root.rglob("*")} == stamps


def test_other_parameters_are_refused_unless_overwrite(tmp_path, test_font):
    root = tmp_path / "set"
    glyph_dataset(root, classes=["U+0041", "U+0046"], splits={"train": 2}, fonts=test_font)
    with pytest.raises(ValueError, match=r"other parameters \(differing: seed\)"):
        glyph_dataset(root, classes=["U+0041", "U+0046"], splits={"train": 2}, seed=9, fonts=test_font)
    rebuilt = glyph_dataset(root, classes=["U+0041"], splits={"test": 3}, seed=9, fonts=test_font, overwrite=True)
    assert sorted(p.name for p in root.iterdir()) == ["manifest.json", "test"]  # the old split is gone
    assert rebuilt.num_images == {"test": 3}


def test_a_foreign_folder_is_never_written_into(tmp_path, test_font):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="not empty"):
            glyph_dataset(tmp_path / "mine", classes=["U+0041"], splits={"train": 1}, fonts=test_font,
                          overwrite=overwrite)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_an_interrupted_build_is_resumed_or_rebuilt(tmp_path, test_font):
    kwargs = dict(classes=["U+0041", "U+0046", "U+0416"], splits={"train": 3, "test": 2}, fonts=test_font)
    reference = _files(glyph_dataset(tmp_path / "reference", **kwargs).root)
    root = tmp_path / "set"
    glyph_dataset(root, **kwargs)
    # Simulate a build killed midway: marker back, manifest gone, some files missing, a temporary left.
    manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    (root / ".glyphs-build.json").write_text(json.dumps(manifest["spec"]), encoding="utf-8")
    (root / "manifest.json").unlink()
    for path in sorted(root.rglob("*.png"))[::2]:
        path.unlink()
    (root / "train" / "U+0041" / ".00000.png.123.tmp").write_bytes(b"half")
    resumed = glyph_dataset(root, **kwargs)
    assert _files(resumed.root) == reference
    assert not list(root.rglob("*.tmp")) and not (root / ".glyphs-build.json").exists()
    # Killed midway through other parameters: the partial splits are removed and rebuilt.
    (root / ".glyphs-build.json").write_text(json.dumps(dict(manifest["spec"], seed=99, splits={"old": [0, 1]})),
                                             encoding="utf-8")
    (root / "manifest.json").unlink()
    (root / "old" / "U+0041").mkdir(parents=True)
    (root / "old" / "U+0041" / "00000.png").write_bytes(b"stale")
    rebuilt = glyph_dataset(root, **kwargs)
    assert not (root / "old").exists() and _files(rebuilt.root) == reference


def test_bad_arguments_are_refused_before_any_work(tmp_path, test_font):
    root = tmp_path / "never"
    with pytest.raises(ValueError, match="exactly one of classes"):
        glyph_dataset(root, fonts=test_font)
    with pytest.raises(ValueError, match=r"U\+0391 duplicates U\+0041"):
        glyph_dataset(root, classes=["U+0391"], fonts=test_font)
    with pytest.raises(ValueError, match="twice"):
        glyph_dataset(root, classes=["U+0041", "U+0041"], fonts=test_font)
    with pytest.raises(ValueError, match="splits"):
        glyph_dataset(root, classes=["U+0041"], splits={"train": 0}, fonts=test_font)
    with pytest.raises(ValueError, match="split names"):
        glyph_dataset(root, classes=["U+0041"], splits={"../up": 2}, fonts=test_font)
    with pytest.raises(TypeError, match="splits"):
        glyph_dataset(root, classes=["U+0041"], splits=[2, 3], fonts=test_font)
    with pytest.raises(ValueError, match="seed"):
        glyph_dataset(root, classes=["U+0041"], seed=-1, fonts=test_font)
    with pytest.raises(ValueError, match="image_size"):
        glyph_dataset(root, classes=["U+0041"], image_size=0, fonts=test_font)
    with pytest.raises(TypeError, match="labeled"):
        glyph_dataset(root, classes=["U+0041"], labeled="yes", fonts=test_font)
    with pytest.raises(ValueError, match="num_workers"):
        glyph_dataset(root, classes=["U+0041"], num_workers=-2, fonts=test_font)
    assert not root.exists()


@pytest.mark.slow
def test_parallel_build_equals_serial_build_and_leaves_the_start_method_alone(tmp_path, cm_fonts):
    before = multiprocessing.get_start_method(allow_none=True)
    classes = split_classes("Latin", [6], seed=1, fonts=cm_fonts)[0]
    kwargs = dict(classes=classes, splits={"train": 4, "test": 3}, seed=4, fonts=cm_fonts)
    serial = glyph_dataset(tmp_path / "serial", num_workers=0, **kwargs)
    parallel = glyph_dataset(tmp_path / "parallel", num_workers=2, **kwargs)
    assert _files(serial.root) == _files(parallel.root) and len(_files(serial.root)) == 42
    assert multiprocessing.get_start_method(allow_none=True) == before


def test_contact_sheet_has_one_row_per_script(tmp_path, test_font):
    path = tmp_path / "sheet.png"
    sheet = contact_sheet(path, per_script=4, fonts=test_font, min_classes=1, zoom=1)
    assert path.exists() and sheet.size == (175 + 4 * 34, 3 * 34)
    assert os.path.getsize(path) < 200_000


def test_noto_fonts_are_an_optional_extra(tmp_path, monkeypatch, test_font):
    from rcfast.data.glyphs import fonts as fonts_module

    folder = tmp_path / "noto"
    folder.mkdir()
    for name in ("NotoSansTest-Regular.ttf", "NotoSansTest-Light.ttf"):  # Light is not one of the 4 styles used
        (folder / name).write_bytes(Path(test_font).read_bytes())
    monkeypatch.setattr(fonts_module, "NOTO_DIRS", (str(folder), str(tmp_path / "not-installed")))
    keys = [f.key for f in resolve_fonts(["matplotlib", "noto"])]
    assert "NotoSansTest-Regular" in keys and "NotoSansTest-Light" not in keys and "DejaVuSans" in keys
    monkeypatch.setattr(fonts_module, "NOTO_DIRS", (str(tmp_path / "not-installed"),))
    assert [f.key for f in resolve_fonts(["matplotlib", "noto"])] == [f.key for f in resolve_fonts("matplotlib")]


def test_a_missing_optional_dependency_is_named_before_any_work(tmp_path, monkeypatch, test_font):
    import rcfast.extras
    from rcfast.extras import MissingExtraError

    real = rcfast.extras._importable
    monkeypatch.setattr(rcfast.extras, "_importable", lambda module: module != "sklearn" and real(module))
    with pytest.raises(MissingExtraError, match="scikit-learn"):
        glyph_dataset(tmp_path / "never", classes=["U+0041"], fonts=test_font)
    assert not (tmp_path / "never").exists()
