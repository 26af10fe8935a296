"""rcfast.data.demo_dataset: the digits demo data's splits, counts, disjointness and idempotency."""

import json
import os
from pathlib import Path

import pytest
import torch

from rcfast.data import ProxyImages, demo_dataset


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root, demo_dataset(root)


def _ids(folder):
    return {p.stem for p in Path(folder).rglob("*.png")}


def _class_counts(folder):
    return {d.name: len(list(d.glob("*.png"))) for d in sorted(Path(folder).iterdir())}


def test_manifest_counts_match_the_files(demo):
    root, m = demo
    assert m["root"] == str(root.resolve()) and m["num_source_images"] == 1797
    for name in ("teacher_all", "task_a", "task_b"):
        for split in ("train", "test"):
            assert sum(_class_counts(m[name][split]).values()) == m[name][f"num_{split}"]
    for task in m["downstream"].values():
        for split in ("train", "test"):
            assert sorted(_class_counts(task[split])) == task["classes"]
            assert sum(_class_counts(task[split]).values()) == task[f"num_{split}"]
    assert len(list(Path(m["proxy"]["path"]).glob("*.png"))) == m["proxy"]["num_images"]
    # Every digit is in exactly one of teacher / proxy / downstream.
    total = (m["teacher_all"]["num_train"] + m["teacher_all"]["num_test"] + m["proxy"]["num_images"]
             + m["downstream"]["parity"]["num_train"] + m["downstream"]["parity"]["num_test"])
    assert total == 1797


def test_splits_are_disjoint_and_tasks_are_class_subsets(demo):
    _, m = demo
    teacher = _ids(m["teacher_all"]["train"]) | _ids(m["teacher_all"]["test"])
    proxy = _ids(m["proxy"]["path"])
    downstream = _ids(m["downstream"]["parity"]["train"]) | _ids(m["downstream"]["parity"]["test"])
    assert not teacher & proxy and not teacher & downstream and not proxy & downstream
    assert not _ids(m["teacher_all"]["train"]) & _ids(m["teacher_all"]["test"])
    assert _ids(m["downstream"]["parity"]["train"]) == _ids(m["downstream"]["inverted_tinted"]["train"])
    assert sorted(_class_counts(m["task_a"]["train"])) == ["0", "1", "2", "3", "4"]
    assert sorted(_class_counts(m["task_b"]["train"])) == ["5", "6", "7", "8", "9"]
    assert _ids(m["task_a"]["train"]) | _ids(m["task_b"]["train"]) == _ids(m["teacher_all"]["train"])
    # Every class has images in every split it belongs to (stratified split).
    assert all(n > 0 for n in _class_counts(m["teacher_all"]["test"]).values())


def _snapshot(root: Path) -> dict:
    """Every entry under root with what a rewrite would change (inode, size, mtime)."""
    return {str(p.relative_to(root)): (p.lstat().st_ino, p.lstat().st_size, p.lstat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def test_second_call_rewrites_nothing(demo, monkeypatch):
    """The manifest makes a second call a no-op: no file written, replaced or added."""
    root, m = demo
    before = _snapshot(root)
    from PIL import Image

    def no_writes(*args, **kwargs):
        raise AssertionError("demo_dataset wrote an image on a second call")

    monkeypatch.setattr(Image.Image, "save", no_writes)
    again = demo_dataset(root)
    assert again == m
    assert _snapshot(root) == before
    stored = json.loads((root / "manifest.json").read_text())
    assert not os.path.isabs(stored["proxy"]["path"])  # relocatable: stored relative to root


def test_a_half_written_root_is_rebuilt(tmp_path):
    (tmp_path / "proxy").mkdir()
    (tmp_path / "proxy" / "stale.png").write_bytes(b"left over from an interrupted call")
    m = demo_dataset(tmp_path)
    assert not (tmp_path / "proxy" / "stale.png").exists()
    assert len(list(Path(m["proxy"]["path"]).glob("*.png"))) == m["proxy"]["num_images"]
    assert not list(tmp_path.glob(".demo-build-*"))


def test_demo_folders_load_with_proxy_images(demo, monkeypatch, tmp_path):
    monkeypatch.setenv("RCFAST_CACHE_DIR", str(tmp_path / "cache"))
    _, m = demo
    teacher = ProxyImages(m["task_b"]["train"], image_size=32, batch_size=64, labels=True,
                          augment="center", backend="pil", num_threads=0)
    assert teacher.classes == ["5", "6", "7", "8", "9"] and teacher.total_images == m["task_b"]["num_train"]
    images, labels = next(iter(teacher))
    assert images.shape == (64, 3, 32, 32) and labels.max() <= 4
    proxy = ProxyImages(m["proxy"]["path"], image_size=32, batch_size=50, backend="pil", num_threads=0)
    assert proxy.total_images == m["proxy"]["num_images"]
    assert isinstance(next(iter(proxy)), torch.Tensor)
