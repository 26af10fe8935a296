"""rcfast.data sources: listing, labels, list files, bad input, the image-check cache, bad arguments."""

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import images as helpers_images
from rcfast.data import IMAGENET_MEAN, IMAGENET_STD, ProxyImages, sources


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RCFAST_CACHE_DIR", str(tmp_path / "cache"))


def _smooth(width, height, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    c = rng.uniform(0.5, 3.0, size=3)
    rgb = np.stack([(np.sin(x / 9 * c[0]) + 1) * 127, (np.cos(y / 7 * c[1]) + 1) * 127,
                    ((x + y) * c[2]) % 255], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def _write_classes(root: Path, per_class=(3, 2, 4), ext="png"):
    for c, n in enumerate(per_class):
        d = root / f"class_{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n):
            _smooth(30 + i, 20 + c, seed=c * 10 + i).save(d / f"img{i}.{ext}")
    return root


def _open_recording_warnings(root, **kwargs):
    """ProxyImages(root, **kwargs) and the skip warning's text ('' when none)."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ds = ProxyImages(root, **kwargs)
    skips = _skip_warnings(record)
    return ds, str(skips[0].message) if skips else ""


def _skip_warnings(record):
    return [w for w in record if "not readable images" in str(w.message)]


def test_folder_labels_follow_sorted_class_folders(tmp_path):
    root = _write_classes(tmp_path / "data")
    (root / "class_1" / "nested").mkdir()
    _smooth(25, 25, 99).save(root / "class_1" / "nested" / "deep.png")
    (root / "README.txt").write_text("not an image: ignored by extension")
    ds = ProxyImages(root, image_size=16, batch_size=4, labels=True, backend="pil",
                     augment="center", num_threads=0)
    assert ds.classes == ["class_0", "class_1", "class_2"]
    assert ds.num_classes == 3
    assert ds.total_images == 10
    labels = torch.cat([y for _, y in ds])
    assert labels.dtype == torch.int64
    assert sorted(labels.tolist()) == [0] * 3 + [1] * 3 + [2] * 4


def test_labels_need_class_folders(tmp_path):
    root = _write_classes(tmp_path / "data")
    _smooth(20, 20, 5).save(root / "loose.png")
    with pytest.raises(ValueError, match="labels=True needs class sub-folders"):
        ProxyImages(root, labels=True, backend="pil")
    # Without labels the same folder is fine: everything is found recursively.
    assert ProxyImages(root, labels=False, backend="pil", image_size=8).total_images == 10


def test_list_file_relative_paths_and_labels(tmp_path):
    root = _write_classes(tmp_path / "data")
    listing = tmp_path / "data" / "list.txt"
    listing.write_text("# comment line\n\nclass_0/img0.png 7\nclass_2/img3.png 1\n"
                       f"{root / 'class_1' / 'img0.png'}\t4\n")
    ds = ProxyImages(listing, image_size=12, batch_size=8, labels=True, backend="pil",
                     augment="none", num_threads=0)
    assert ds.total_images == 3
    assert ds.classes is None and ds.num_classes == 8
    _, labels = next(iter(ds))
    assert sorted(labels.tolist()) == [1, 4, 7]
    # Paths only, labels not requested: the label column is optional.
    (tmp_path / "paths.txt").write_text("data/class_0/img1.png\ndata/class_0/img2.png\n")
    assert ProxyImages(tmp_path / "paths.txt", backend="pil", image_size=8).total_images == 2
    with pytest.raises(ValueError, match="line 1 .* no integer label"):
        ProxyImages(tmp_path / "paths.txt", labels=True, backend="pil")


def _corrupt_folder(tmp_path):
    root = _write_classes(tmp_path / "data", per_class=(4, 4), ext="jpg")
    good = sorted(str(p) for p in root.rglob("*.jpg"))
    (root / "class_0" / "zero.jpg").write_bytes(b"")
    whole = (root / "class_0" / "img0.jpg").read_bytes()
    (root / "class_0" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "class_1" / "text.jpg").write_text("this is a text file named .jpg\n" * 10)
    (root / "class_1" / "garbage.png").write_bytes(os.urandom(2000))
    return root, good


@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_corrupt_files_warn_once_and_every_good_image_is_delivered(tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    root, good = _corrupt_folder(tmp_path)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ds = ProxyImages(root, image_size=16, batch_size=3, labels=True, backend=backend,
                         augment="center", num_threads=1)
    skips = _skip_warnings(record)
    assert len(skips) == 1
    message = str(skips[0].message)
    assert "skipping 4 of 12 files" in message
    for name in ("zero.jpg", "truncated.jpg", "text.jpg", "garbage.png"):
        assert name in message
    assert sorted(p for p, _ in ds.skipped) == sorted(
        str(root / c / n) for c, n in [("class_0", "zero.jpg"), ("class_0", "truncated.jpg"),
                                       ("class_1", "text.jpg"), ("class_1", "garbage.png")])
    labels = torch.cat([y for _, y in ds])
    assert len(labels) == len(good) == 8
    assert sorted(labels.tolist()) == [0] * 4 + [1] * 4


def test_check_results_are_cached_by_path_size_and_mtime(tmp_path, monkeypatch):
    root, good = _corrupt_folder(tmp_path)
    calls = []
    real_inspect = sources._inspect
    monkeypatch.setattr(sources, "_inspect", lambda p, m: (calls.append(p), real_inspect(p, m))[1])
    sources_set = sources.scan(root, labels=False)
    assert len(calls) == 12 and len(sources_set.paths) == 8
    index_files = list((tmp_path / "cache" / "image_index").glob("*.json"))
    assert len(index_files) == 1

    calls.clear()
    again = sources.scan(root, labels=False)
    assert calls == []  # nothing re-checked
    assert again.paths == sources_set.paths and len(again.skipped) == 4

    # A changed file (new size and mtime) is checked again, and only it.
    fixed = root / "class_0" / "zero.jpg"
    _smooth(33, 21, 1).save(fixed, format="JPEG")
    calls.clear()
    third = sources.scan(root, labels=False)
    assert calls == [str(fixed)]
    assert str(fixed) in third.paths and len(third.skipped) == 3


@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_grayscale_rgba_palette_and_jpeg_become_rgb(tmp_path, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    base = _smooth(40, 30, 3)
    base.save(tmp_path / "rgb.jpg", quality=95)
    base.convert("L").save(tmp_path / "gray.png")
    base.convert("L").save(tmp_path / "gray.jpg", quality=95)
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(tmp_path / "rgba.png")
    base.convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "palette.png")
    ds = ProxyImages(tmp_path, image_size=20, batch_size=8, augment="center", backend=backend,
                     num_threads=1)
    images = next(iter(ds))
    assert images.shape == (5, 3, 20, 20) and torch.isfinite(images).all()
    names = [Path(p).name for p in ds._images.paths]
    by_name = dict(zip(names, images))
    # Grey inputs give three equal channels after undoing the per-channel normalisation.
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    gray_pixels = by_name["gray.png"] * std + mean
    assert torch.allclose(gray_pixels[0], gray_pixels[1], atol=1e-5)
    assert torch.allclose(gray_pixels[1], gray_pixels[2], atol=1e-5)
    # Alpha is dropped, not composited; the palette image is close to its RGB source.
    # (The palette's 256 colours quantise the gradients: compare on average.)
    assert (by_name["rgba.png"] - by_name["palette.png"]).abs().mean() < 0.1
    assert (by_name["rgba.png"] - by_name["rgb.jpg"]).abs().mean() < 0.05


def test_missing_and_empty_sources_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="source"):
        ProxyImages(tmp_path / "nope", backend="pil")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no readable image"):
        ProxyImages(tmp_path / "empty", backend="pil")
    bad = tmp_path / "only_bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="no readable image .*x.jpg"):
        ProxyImages(bad, backend="pil")
    (tmp_path / "empty.txt").write_text("\n# nothing\n")
    with pytest.raises(ValueError, match="no readable image"):
        ProxyImages(tmp_path / "empty.txt", backend="pil")


@pytest.mark.parametrize("kwargs, name", [
    (dict(image_size=0), "image_size"), (dict(image_size=-3), "image_size"),
    (dict(image_size=2.5), "image_size"), (dict(batch_size=0), "batch_size"),
    (dict(augment="random"), "augment"), (dict(backend="opencv"), "backend"),
    (dict(dtype=torch.int64), "dtype"), (dict(dtype="float64"), "dtype"),
    (dict(num_threads=-1), "num_threads"), (dict(shard_id=2, num_shards=2), "shard_id"),
    (dict(num_shards=0), "num_shards"), (dict(device="meta"), "device"), (dict(seed=-1), "seed"),
    (dict(batch_size=-4), "batch_size"), (dict(batch_size=True), "batch_size"), (dict(image_size="224"), "image_size"),
    (dict(shard_id=-1, num_shards=2), "shard_id"), (dict(shard_id=1.0, num_shards=2), "shard_id"),
    (dict(num_shards=-2), "num_shards"), (dict(num_threads=1.5), "num_threads"), (dict(seed=0.5), "seed"),
    (dict(prefetch=0), "prefetch"), (dict(max_pixels=0), "max_pixels"), (dict(max_pixels=-1), "max_pixels"),
    (dict(max_pixels=10**12), "max_pixels"), (dict(skip_damaged_jpegs="yes"), "skip_damaged_jpegs"),
    (dict(labels="yes"), "labels"), (dict(drop_last=1), "drop_last"), (dict(shuffle="no"), "shuffle"),
    (dict(dtype=None), "dtype"), (dict(device="cuda:0" if not torch.cuda.is_available() else "xla"), "device"),
])
def test_bad_arguments_raise_naming_the_argument(tmp_path, kwargs, name):
    root = _write_classes(tmp_path / "data", per_class=(1,))
    with pytest.raises(ValueError, match=name):
        ProxyImages(root, **{"backend": "pil", **kwargs})


def test_auto_backend_warns_once_when_dali_is_not_importable(tmp_path, monkeypatch):
    import sys
    root = _write_classes(tmp_path / "data", per_class=(2,))
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # import now raises ImportError
    monkeypatch.delitem(sys.modules, "rcfast.data.dali_pipeline", raising=False)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ds = ProxyImages(root, image_size=8, backend="auto", device="cpu")
    relevant = [w for w in record if "rcfast.data" in str(w.message)]
    assert len(relevant) == 1
    assert "DALI is not importable" in str(relevant[0].message)
    assert "using the PIL backend" in str(relevant[0].message)
    assert ds.backend == "pil"
    with pytest.raises(ValueError, match="backend='dali' is not usable"):
        ProxyImages(root, image_size=8, backend="dali")


# ------------------------------------------------------------------ symlinks
def _images_under(root: Path, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        _smooth(24, 20, seed=len(str(path))).save(path)


def _links_warnings(record):
    return [w for w in record if "symbolic link" in str(w.message)]


@pytest.mark.parametrize("links", [{"self": "."}, {"up": ".."}, {"self": ".", "up": "..", "sub/back": "../.."}])
def test_symlink_loops_list_every_image_once(tmp_path, links):
    """Regression: `self -> .` counted 2 images as 82; `up -> ..` walked until memory ran out."""
    (tmp_path / "sibling").mkdir()
    _smooth(24, 20, 1).save(tmp_path / "sibling" / "outside.png")  # must not be pulled in through `up`
    root = tmp_path / "data"
    _images_under(root, ["a.png", "sub/b.png"])
    for name, target in links.items():
        (root / name).symlink_to(target, target_is_directory=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ds = ProxyImages(root, image_size=8, batch_size=2, backend="pil", num_threads=0)
    assert sorted(Path(p).relative_to(root).as_posix() for p in ds._images.paths) == ["a.png", "sub/b.png"]
    assert ds.total_images == 2 and len(list(ds)) == 1
    [warning] = _links_warnings(record)
    message = str(warning.message)
    assert f"not following {len(links)} symbolic link(s)" in message
    for name, target in links.items():
        assert f"{root / name} -> {target}" in message


def test_symlinked_folders_are_followed_once_and_real_paths_win(tmp_path):
    store = tmp_path / "store"
    _images_under(store, ["cats/c1.png", "cats/c2.png", "dogs/d1.png"])
    root = tmp_path / "data"
    _images_under(root, ["birds/b1.png"])
    (root / "cats").symlink_to(store / "cats", target_is_directory=True)   # a class folder elsewhere
    (root / "dogs").symlink_to(store / "dogs", target_is_directory=True)
    (root / "birds_again").symlink_to(root / "birds", target_is_directory=True)  # second path to a real folder
    (root / "a_dogs_alias").symlink_to(store / "dogs", target_is_directory=True)  # sorts before 'dogs'
    (root / "dangling").symlink_to(tmp_path / "nowhere", target_is_directory=True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ds = ProxyImages(root, image_size=8, batch_size=8, labels=True, backend="pil", num_threads=0)
    rel = sorted(Path(p).relative_to(root).as_posix() for p in ds._images.paths)
    # The real 'birds' wins over its alias; the store's dogs appear once, under
    # the first link in sorted order.
    assert rel == ["a_dogs_alias/d1.png", "birds/b1.png", "cats/c1.png", "cats/c2.png"]
    assert ds.classes == ["a_dogs_alias", "birds", "cats"]
    message = str(_links_warnings(record)[0].message)
    assert "not following 2 symbolic link(s)" in message
    assert "birds_again" in message and f"{root / 'dogs'} ->" in message


def test_symlinked_files_are_listed_and_dangling_ones_skipped(tmp_path):
    root = tmp_path / "data"
    _images_under(root, ["a.png"])
    (root / "b.png").symlink_to(root / "a.png")
    (root / "gone.png").symlink_to(tmp_path / "missing.png")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ds = ProxyImages(root, image_size=8, batch_size=2, backend="pil", num_threads=0)
    assert ds.total_images == 2  # an explicit file link is the user's choice
    assert [Path(p).name for p, _ in ds.skipped] == ["gone.png"]
    assert "skipping 1 of 3 files" in str(_skip_warnings(record)[0].message)


# ---------------------------------------------------------- pixel limit (bombs)
@pytest.fixture(scope="module")
def bomb_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    path.write_bytes(helpers_images.png_bomb(13000))  # 169 megapixels in ~0.2 MB
    return path


@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_decompression_bomb_is_skipped_from_its_header_without_decoding(tmp_path, bomb_png, monkeypatch, backend):
    """Regression: a 13000^2 PNG of a few hundred KB passed the check and DALI decoded it at full size."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    import shutil
    from PIL import ImageFile
    root = _write_classes(tmp_path / "data", per_class=(3,))
    shutil.copy(bomb_png, root / "class_0" / "bomb.png")
    assert (root / "class_0" / "bomb.png").stat().st_size < 1_000_000
    real_load = ImageFile.ImageFile.load

    def load_but_not_the_bomb(im):
        assert Path(str(getattr(im, "filename", ""))).name != "bomb.png", "the bomb was decoded"
        return real_load(im)

    monkeypatch.setattr(ImageFile.ImageFile, "load", load_but_not_the_bomb)
    ds, message = _open_recording_warnings(root, image_size=16, batch_size=4, backend=backend, num_threads=1)
    assert "skipping 1 of 4 files" in message
    assert "bomb.png (169000000 pixels (13000 x 13000) > max_pixels=89478485" in message
    assert ds.total_images == 3 and sum(len(b) for b in ds) == 3


@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_max_pixels_is_one_configurable_limit_and_changing_it_needs_no_recheck(tmp_path, monkeypatch, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    root = tmp_path / "data"
    root.mkdir()
    _smooth(100, 80, 1).save(root / "big.png")      # 8000 pixels
    _smooth(40, 30, 2).save(root / "small.jpg")     # 1200 pixels
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        ds = ProxyImages(root, image_size=8, batch_size=2, backend=backend, max_pixels=5000, num_threads=0)
    assert [Path(p).name for p in ds._images.paths] == ["small.jpg"]
    assert "big.png (8000 pixels (100 x 80) > max_pixels=5000" in str(_skip_warnings(record)[0].message)
    assert sum(len(b) for b in ds) == 1
    # A larger limit admits it: the file is checked (decoded) now, once.
    calls = []
    real_inspect = sources._inspect
    monkeypatch.setattr(sources, "_inspect", lambda p, m: (calls.append(Path(p).name), real_inspect(p, m))[1])
    assert ProxyImages(root, image_size=8, backend=backend, max_pixels=8000).total_images == 2
    assert calls == ["big.png"]
    calls.clear()
    assert ProxyImages(root, image_size=8, backend=backend, max_pixels=5000).total_images == 1
    assert calls == []  # the limit is applied to the cached sizes


# -------------------------------------------------------------- damaged JPEGs
def _damaged_folder(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    for i in range(3):
        _smooth(64, 48, i).save(root / f"good{i}.jpg", quality=90)
    for name, data in helpers_images.damaged_jpegs().items():
        (root / name).write_bytes(data)
    return root


@pytest.mark.parametrize("backend", ["pil", "dali"])
def test_damaged_jpeg_entropy_data_is_reported_as_corrupt(tmp_path, backend):
    """Regression: JPEGs with damaged entropy-coded data decoded to garbage without a word."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali")
    root = _damaged_folder(tmp_path)
    for name in helpers_images.damaged_jpegs():  # the failure: PIL decodes them without any error
        with Image.open(root / name) as im:
            im.load()
    ds, message = _open_recording_warnings(root, image_size=16, batch_size=4, backend=backend, num_threads=1)
    assert "skipping 3 of 6 files" in message
    assert "cut_middle.jpg (damaged JPEG data: Corrupt JPEG data: premature end of data segment)" in message
    assert "flipped_bits.jpg (damaged JPEG data: Corrupt JPEG data:" in message
    assert sorted(Path(p).name for p in ds._images.paths) == ["good0.jpg", "good1.jpg", "good2.jpg"]
    assert sum(len(b) for b in ds) == 3


def test_damaged_jpegs_can_be_kept_and_the_choice_needs_no_recheck(tmp_path, monkeypatch):
    root = _damaged_folder(tmp_path)
    assert ProxyImages(root, image_size=8, backend="pil").total_images == 3
    calls = []
    monkeypatch.setattr(sources, "_inspect", lambda p, m: calls.append(p))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        kept = ProxyImages(root, image_size=8, batch_size=6, backend="pil", skip_damaged_jpegs=False)
    assert kept.total_images == 6 and calls == [] and not _skip_warnings(record)
    assert next(iter(kept)).shape == (6, 3, 8, 8)


def test_a_truncated_jpeg_is_still_unreadable_when_damage_is_allowed(tmp_path):
    root = _damaged_folder(tmp_path)
    data = (root / "good0.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    ds = ProxyImages(root, image_size=8, backend="pil", skip_damaged_jpegs=False)
    assert [(Path(p).name, r) for p, r in ds.skipped] == [("truncated.jpg", "OSError: Premature end of JPEG file")]


def test_cmyk_and_greyscale_jpegs_pass_the_check(tmp_path):
    root = tmp_path / "data"
    root.mkdir()
    base = _smooth(48, 40, 3)
    base.convert("CMYK").save(root / "cmyk.jpg", quality=95)
    base.convert("L").save(root / "grey.jpg", quality=95)
    base.save(root / "progressive.jpg", quality=95, progressive=True)
    ds = ProxyImages(root, image_size=8, backend="pil")
    assert ds.total_images == 3 and ds.skipped == []


def test_a_shard_without_a_single_batch_is_refused_naming_the_settings(tmp_path):
    root = _write_classes(tmp_path / "data", per_class=(5,))
    with pytest.raises(ValueError, match="batch_size=8 with drop_last=True"):
        ProxyImages(root, batch_size=8, drop_last=True, backend="pil")
    with pytest.raises(ValueError, match="shard 6 of num_shards=7 gets 0 of the source's 5 images"):
        ProxyImages(root, batch_size=1, shard_id=6, num_shards=7, backend="pil")
    assert len(ProxyImages(root, batch_size=8, drop_last=False, backend="pil")) == 1


def test_a_list_file_naming_missing_paths_is_an_error_naming_them(tmp_path):
    root = _write_classes(tmp_path / "data", per_class=(2,))
    listing = tmp_path / "list.txt"
    listing.write_text("data/class_0/img0.png\ndata/class_0/nope.png\nimg1.png\n")
    with pytest.raises(ValueError, match=r"names 2 path\(s\) that do not exist: .*nope.png.*img1.png.*resolved "
                                         r"against the list's folder"):
        ProxyImages(listing, backend="pil")
    assert root.exists()


def test_a_source_that_is_not_a_list_or_folder_is_refused(tmp_path):
    image = tmp_path / "photo.jpg"
    _smooth(20, 20, 0).save(image)
    with pytest.raises(ValueError, match="not a UTF-8 text list of image paths.*pass the folder"):
        ProxyImages(image, backend="pil")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # reading it would block forever
    with pytest.raises(ValueError, match="neither a folder nor a regular file"):
        ProxyImages(fifo, backend="pil")
    for bad in (None, 3, ["a", "b"]):
        with pytest.raises(ValueError, match="source must be"):
            ProxyImages(bad, backend="pil")


@pytest.mark.parametrize("state, match", [
    ({"epoch": 0}, "no 'batches_consumed'"), ({"batches_consumed": 0}, "no 'epoch'"),
    ({"epoch": "0", "batches_consumed": 0}, r"state_dict\['epoch'\] must be an integer"),
    ({"epoch": 0, "batches_consumed": 1.5}, "must be an integer"), ([0, 1], "must be a dict"),
    ({"epoch": -1, "batches_consumed": 0}, "out of range"), ({"epoch": 0, "batches_consumed": 3}, "out of range"),
    ({"epoch": 0, "batches_consumed": 0, "seed": 7}, "seed=7"),
])
def test_load_state_dict_rejects_malformed_states(tmp_path, state, match):
    root = _write_classes(tmp_path / "data", per_class=(3,))
    ds = ProxyImages(root, batch_size=2, backend="pil")
    with pytest.raises(ValueError, match=match):
        ds.load_state_dict(state)
    assert ds.state_dict()["batches_consumed"] == 0 and ds.epoch == 0


def test_a_missing_jpeg_checker_is_named_before_any_file_is_checked(tmp_path, monkeypatch):
    import sys
    root = _write_classes(tmp_path / "data", per_class=(2,), ext="jpg")
    monkeypatch.setitem(sys.modules, "simplejpeg", None)  # import now fails
    calls = []
    monkeypatch.setattr(sources, "_inspect", lambda p, m: calls.append(p))
    with pytest.raises(ImportError, match=r"needs simplejpeg, which is not installed: pip install 'rcfast\[data\]'"):
        ProxyImages(root, backend="pil")
    assert calls == []
