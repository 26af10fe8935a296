"""rcfast.data sources: listing, labels, list files, bad input, the image-check cache, bad arguments."""

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

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
    monkeypatch.setattr(sources, "_inspect", lambda p: (calls.append(p), real_inspect(p))[1])
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
