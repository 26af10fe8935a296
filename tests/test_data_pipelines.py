"""rcfast.data.ProxyImages batches: both backends, their agreement, sharding, determinism, resume."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from rcfast.data import IMAGENET_MEAN, IMAGENET_STD, ProxyImages
from rcfast.data import plan

BACKENDS = ["pil", "dali"]


def _need(backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("RCFAST_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "rcfast_cache"))


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory):
    """23 smooth JPEG/PNG images of varied sizes and aspect ratios."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(0)
    for i in range(23):
        w, h = int(rng.integers(24, 90)), int(rng.integers(24, 90))
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        f = rng.uniform(0.05, 0.3, size=3)
        rgb = np.stack([(np.sin(x * f[0]) + 1) * 120, (np.cos(y * f[1]) + 1) * 120,
                        (np.sin((x + y) * f[2]) + 1) * 120], axis=-1).astype(np.uint8)
        ext = "jpg" if i % 2 else "png"
        Image.fromarray(rgb).save(root / f"img{i:02d}.{ext}", quality=95)
    return root


@pytest.fixture(scope="module")
def id_listing(mixed_folder):
    """A list file giving every image its index as label: labels identify images."""
    paths = sorted(p.name for p in mixed_folder.iterdir())
    listing = mixed_folder.parent / "ids.txt"
    listing.write_text("".join(f"{mixed_folder.name}/{p} {i}\n" for i, p in enumerate(paths)))
    return listing


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
    """scikit-learn's real sample photographs (640x427 JPEGs) and 3 crops of each."""
    from sklearn.datasets import load_sample_images
    root = tmp_path_factory.mktemp("photos")
    for k, array in enumerate(load_sample_images().images):
        photo = Image.fromarray(array)
        photo.save(root / f"photo{k}.jpg", quality=92)
        for j, box in enumerate([(0, 0, 400, 300), (200, 100, 640, 427), (100, 50, 350, 400)]):
            photo.crop(box).save(root / f"photo{k}_crop{j}.jpg", quality=92)
    return root


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("augment", ["rrc_flip", "center", None])
def test_shapes_dtype_and_normalisation(photo_folder, backend, augment):
    _need(backend)
    ds = ProxyImages(photo_folder, image_size=48, batch_size=5, augment=augment, backend=backend,
                     device="cpu", num_threads=2)
    assert ds.backend == backend and ds.device == torch.device("cpu")
    assert len(ds) == 2 and ds.num_images == 8
    batches = list(ds)
    assert [b.shape for b in batches] == [(5, 3, 48, 48), (3, 3, 48, 48)]
    images = torch.cat(batches)
    assert images.dtype == torch.float32 and images.is_contiguous()
    # Undo the ImageNet normalisation: pixels are back in [0, 1].
    pixels = images * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    assert pixels.min() >= -1e-4 and pixels.max() <= 1 + 1e-4
    assert pixels.std() > 0.1  # real photographs, not a constant


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_outputs(mixed_folder, backend, dtype):
    _need(backend)
    kwargs = dict(image_size=16, batch_size=8, augment="center", backend=backend)
    full = next(iter(ProxyImages(mixed_folder, **kwargs)))
    low = next(iter(ProxyImages(mixed_folder, dtype=dtype, **kwargs)))
    assert low.dtype == dtype
    torch.testing.assert_close(low.float(), full, atol=0.02, rtol=0.01)


@pytest.mark.parametrize("augment", ["center", "rrc_flip", None])
def test_dali_and_pil_batches_agree(photo_folder, augment):
    pytest.importorskip("nvidia.dali")
    kwargs = dict(image_size=64, batch_size=8, augment=augment, seed=5)
    dali = torch.cat(list(ProxyImages(photo_folder, backend="dali", **kwargs)))
    pil = torch.cat(list(ProxyImages(photo_folder, backend="pil", **kwargs)))
    diff = (dali - pil).abs()
    one_level = 1 / 255 / min(IMAGENET_STD)  # one grey level, normalised: 0.017
    # Same windows, both antialiased bilinear: inside the image they agree to
    # within one grey level (PIL rounds to 8 bits, DALI stays in float) ...
    assert diff[..., 1:-1, 1:-1].max() < 2 * one_level
    # ... and on the outermost pixel ring the two resamplers treat the image
    # edge differently (PIL renormalises the clipped filter, DALI clamps).
    assert diff.max() < 25 * one_level
    assert diff.mean() < 0.6 * one_level
    if augment != "center":
        # Whole-box windows: on a CPU the DALI backend resizes with torch's
        # antialiased uint8 bilinear, which matches PIL to one grey level.
        assert diff.max() < 1.01 * one_level


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_file_that_vanishes_after_the_check_raises(tmp_path, mixed_folder, backend):
    _need(backend)
    import shutil
    folder = tmp_path / "copy"
    shutil.copytree(mixed_folder, folder)
    ds = ProxyImages(folder, image_size=16, batch_size=4, backend=backend, shuffle=False, num_threads=1)
    (folder / "img05.jpg").unlink()
    with pytest.raises((OSError, RuntimeError), match="img05"):
        list(ds)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_shards", [2, 3])
def test_shards_cover_every_image_exactly_once(id_listing, backend, num_shards):
    _need(backend)
    seen = []
    for shard in range(num_shards):
        ds = ProxyImages(id_listing, image_size=8, batch_size=4, labels=True, shard_id=shard,
                         num_shards=num_shards, backend=backend, num_threads=1, seed=1)
        ids = torch.cat([y for _, y in ds]).tolist()
        assert len(ids) == ds.num_images
        assert len(ds) == -(-ds.num_images // 4)
        seen += ids
    assert sorted(seen) == list(range(23))


def test_drop_last_gives_every_shard_the_same_full_batches(id_listing):
    counts = []
    for shard in range(3):
        ds = ProxyImages(id_listing, image_size=8, batch_size=3, labels=True, shard_id=shard,
                         num_shards=3, backend="pil", drop_last=True, num_threads=0)
        batches = [y for _, y in ds]
        assert all(len(b) == 3 for b in batches)
        counts.append(len(batches))
        assert len(batches) == len(ds) == (23 // 3) // 3
    assert len(set(counts)) == 1


def test_shards_default_to_torch_distributed_rank(id_listing, monkeypatch):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 4)
    ds = ProxyImages(id_listing, image_size=8, backend="pil")
    assert (ds.shard_id, ds.num_shards) == (1, 4)
    assert ds.num_images == 6  # 23 images: shards of 6, 6, 6, 5


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_batches_new_epoch_new_order(id_listing, backend):
    _need(backend)
    def run(seed, epoch):
        ds = ProxyImages(id_listing, image_size=24, batch_size=6, labels=True, seed=seed,
                         backend=backend, num_threads=2)
        ds.set_epoch(epoch)
        batches = list(ds)
        return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])

    x0, y0 = run(seed=3, epoch=0)
    x0_again, y0_again = run(seed=3, epoch=0)
    assert torch.equal(y0, y0_again) and torch.equal(x0, x0_again)  # bitwise
    x1, y1 = run(seed=3, epoch=1)
    assert sorted(y1.tolist()) == sorted(y0.tolist()) and not torch.equal(y0, y1)
    _, y_other = run(seed=4, epoch=0)
    assert not torch.equal(y0, y_other)


def test_epochs_advance_by_themselves(id_listing):
    ds = ProxyImages(id_listing, image_size=8, batch_size=10, labels=True, backend="pil", num_threads=0)
    first = torch.cat([y for _, y in ds])
    assert ds.epoch == 1 and ds.state_dict()["batches_consumed"] == 0
    second = torch.cat([y for _, y in ds])
    assert ds.epoch == 2 and not torch.equal(first, second)
    ds.set_epoch(0)
    assert torch.equal(torch.cat([y for _, y in ds]), first)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_from_state_dict_gives_the_same_remaining_batches(id_listing, backend):
    _need(backend)
    kwargs = dict(image_size=20, batch_size=4, labels=True, seed=11, backend=backend, num_threads=2)
    reference = ProxyImages(id_listing, **kwargs)
    reference.set_epoch(2)
    uninterrupted = list(reference)
    assert len(uninterrupted) == 6

    stopped = ProxyImages(id_listing, **kwargs)
    stopped.set_epoch(2)
    for k, _ in enumerate(stopped):
        if k == 2:  # a checkpoint taken while holding batch 2
            state = stopped.state_dict()
            break
    assert state["epoch"] == 2 and state["batches_consumed"] == 3

    resumed = ProxyImages(id_listing, **kwargs)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the trainer's usual call keeps the position
    rest = list(resumed)
    assert len(rest) == 3
    for (x, y), (x_ref, y_ref) in zip(rest, uninterrupted[3:]):
        assert torch.equal(y, y_ref) and torch.equal(x, x_ref)
    assert resumed.state_dict()["epoch"] == 3


def test_resume_skips_without_decoding(id_listing, monkeypatch):
    from rcfast.data import pil_pipeline
    opened = []
    real = pil_pipeline.load_window
    monkeypatch.setattr(pil_pipeline, "load_window", lambda p, *a: (opened.append(p), real(p, *a))[1])
    ds = ProxyImages(id_listing, image_size=8, batch_size=4, backend="pil", num_threads=0)
    ds.load_state_dict({"epoch": 0, "batches_consumed": 5})
    assert len(list(ds)) == 1
    assert len(opened) == 3  # only the last batch's images were decoded


def test_load_state_dict_rejects_other_data_settings(id_listing):
    ds = ProxyImages(id_listing, image_size=8, batch_size=4, backend="pil")
    state = ds.state_dict()
    other = ProxyImages(id_listing, image_size=8, batch_size=5, backend="pil")
    with pytest.raises(ValueError, match="batch_size"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="out of range"):
        ds.load_state_dict({"epoch": 0, "batches_consumed": 99})


def test_set_epoch_changes_restart_the_epoch(id_listing):
    ds = ProxyImages(id_listing, image_size=8, batch_size=4, backend="pil", num_threads=0)
    ds.load_state_dict({"epoch": 1, "batches_consumed": 2})
    ds.set_epoch(1)
    assert ds.state_dict()["batches_consumed"] == 2
    ds.set_epoch(4)
    assert (ds.epoch, ds.state_dict()["batches_consumed"]) == (4, 0)


def test_rrc_windows_follow_torchvision_ranges():
    rng = np.random.default_rng(0)
    width, height = rng.integers(20, 400, size=2000), rng.integers(20, 400, size=2000)
    windows, flips = plan.sample_windows("rrc_flip", 224, seed=0, epoch=0, indices=np.arange(2000),
                                         width=width, height=height)
    w, h = windows[:, 2] - windows[:, 0], windows[:, 3] - windows[:, 1]
    assert (windows[:, 0] >= 0).all() and (windows[:, 2] <= width).all()
    assert (windows[:, 1] >= 0).all() and (windows[:, 3] <= height).all()
    area = w * h / (width * height)
    assert area.min() > 0.06 and area.max() <= 1.0  # scale (0.08, 1), up to rounding
    assert 0.4 < flips.mean() < 0.6
    # The same image gets the same window whatever batch it is drawn with.
    again, _ = plan.sample_windows("rrc_flip", 224, 0, 0, np.array([7]), width[7:8], height[7:8])
    assert np.array_equal(again[0], windows[7])


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_batches_match_the_cpu_pipeline(photo_folder, backend):
    """On a GPU (DALI: nvJPEG through the `mixed` decoder) the batches are those of the CPU pipeline."""
    _need(backend)
    kwargs = dict(image_size=32, batch_size=4, labels=False, backend=backend, augment="rrc_flip", seed=3)
    batch = next(iter(ProxyImages(photo_folder, device="cuda", **kwargs)))
    on_cpu = next(iter(ProxyImages(photo_folder, device="cpu", **kwargs)))
    assert batch.is_cuda and batch.shape == (4, 3, 32, 32)
    # nvJPEG and libjpeg-turbo round their IDCTs differently, and the GPU resizes on the device: a few
    # grey levels apart on average (normalised units: ~0.02 each); a wrong crop or channel order is > 0.3.
    assert (batch.cpu() - on_cpu).abs().mean() < 0.1



@pytest.mark.slow  # a fresh Python subprocess
@pytest.mark.parametrize("backend,augment", [("dali", None)])  # the path with finishing threads
def test_iterating_leaves_torch_thread_count_alone(mixed_folder, backend, augment):
    """The pipeline's own threads must not change the training process's
    intra-op thread count. torch.set_num_threads called in any thread sets the
    default that every thread, the main one included, picks up when it first
    runs a parallel op, so this runs in a fresh process, as a trainer would."""
    _need(backend)
    code = (
        "import sys, torch\n"
        "from rcfast.data import ProxyImages\n"
        "if __name__ == '__main__':\n"
        "    torch.set_num_threads(2)\n"
        "    ds = ProxyImages(sys.argv[1], image_size=32, batch_size=4, backend=sys.argv[2],\n"
        "                     augment=None if sys.argv[3] == 'none' else sys.argv[3], num_threads=2)\n"
        "    for _ in ds:\n"
        "        pass\n"
        "    print(torch.get_num_threads())\n"
    )
    result = subprocess.run([sys.executable, "-c", code, str(mixed_folder), backend, augment or "none"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-1] == "2"


def test_pil_iteration_does_not_draw_on_the_global_rng(mixed_folder):
    ds = ProxyImages(mixed_folder, image_size=32, batch_size=8, backend="pil", num_threads=1)
    state = torch.get_rng_state()
    for _ in ds:
        pass
    assert torch.equal(torch.get_rng_state(), state)


# ------------------------------------------------ one pipeline across epochs
def _run(ds, epochs):
    """All batches of `epochs` epochs from the dataset's current position, as (x, y) pairs."""
    return [(x.clone(), y.clone()) for _ in range(epochs) for x, y in ds]


def _assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for (x, y), (x_ref, y_ref) in zip(got, expected):
        assert torch.equal(y, y_ref) and torch.equal(x, x_ref)  # bitwise


DALI_MODES = [pytest.param("rrc_flip", id="torch-finish"), pytest.param("center", id="dali-graph")]


@pytest.mark.parametrize("augment", DALI_MODES)
def test_one_dali_pipeline_serves_every_epoch(id_listing, augment, monkeypatch):
    """The pipeline is built once for the run, not once per epoch (issue 13 item 3), with the same batches."""
    pytest.importorskip("nvidia.dali")
    from rcfast.data import dali_pipeline
    builds = []
    real_build = dali_pipeline.DaliBatches._build
    monkeypatch.setattr(dali_pipeline.DaliBatches, "_build", lambda self, feed: (builds.append(1), real_build(self, feed))[1])
    kwargs = dict(image_size=20, batch_size=5, labels=True, seed=4, backend="dali", augment=augment, num_threads=2)
    ds = ProxyImages(id_listing, **kwargs)
    long_run = _run(ds, epochs=3)
    assert len(builds) == 1 and ds.epoch == 3
    per_epoch = []
    for epoch in range(3):  # a fresh dataset (and pipeline) per epoch: the old behaviour
        fresh = ProxyImages(id_listing, **kwargs)
        fresh.set_epoch(epoch)
        per_epoch += _run(fresh, epochs=1)
        fresh.close()
    _assert_same_batches(long_run, per_epoch)
    ds.close()


@pytest.mark.parametrize("backend,augment", [("pil", "rrc_flip"), ("dali", "rrc_flip"), ("dali", "center")])
@pytest.mark.parametrize("stop", [(0, 1), (1, 3), (1, 5), (2, 0)], ids=["epoch0-batch1", "mid-epoch",
                                                                     "holding-the-last-batch", "epoch-boundary"])
def test_resume_anywhere_matches_an_uninterrupted_run(id_listing, backend, augment, stop):
    """Checkpoint while holding batch k of epoch e (k = 0 and e > 0: right after an epoch ended);
    a new dataset resumed from it yields bitwise the rest of the uninterrupted run, across epochs."""
    _need(backend)
    kwargs = dict(image_size=16, batch_size=4, labels=True, seed=9, backend=backend, augment=augment,
                  num_threads=2)
    uninterrupted = _run(ProxyImages(id_listing, **kwargs), epochs=3)  # 6 batches per epoch
    epoch, k = stop
    stopped = ProxyImages(id_listing, **kwargs)
    seen = 0
    if k == 0:  # the previous epoch ran to its end
        _run(stopped, epochs=epoch)
        state, seen = stopped.state_dict(), 6 * epoch
        assert state["epoch"] == epoch and state["batches_consumed"] == 0
    else:
        for _ in range(epoch):
            seen += len(_run(stopped, epochs=1))
        for j, _ in enumerate(stopped):
            seen += 1
            if j == k:
                state = stopped.state_dict()
                break
        assert state == {**state, "epoch": epoch, "batches_consumed": k + 1}
    stopped.close()
    resumed = ProxyImages(id_listing, **kwargs)
    resumed.load_state_dict(state)
    rest = _run(resumed, epochs=3 - epoch)
    _assert_same_batches(rest, uninterrupted[seen:])
    resumed.close()


@pytest.mark.parametrize("backend,augment", [("pil", "rrc_flip"), ("dali", "rrc_flip"), ("dali", "center")])
def test_breaking_off_and_jumping_keep_the_batches_exact(id_listing, backend, augment):
    """Abandoned iterators, set_epoch jumps and load_state_dict rewinds with work in flight."""
    _need(backend)
    kwargs = dict(image_size=16, batch_size=4, labels=True, seed=2, backend=backend, augment=augment,
                  num_threads=2)
    reference = _run(ProxyImages(id_listing, **kwargs), epochs=4)  # epochs 0..3, 6 batches each
    ds = ProxyImages(id_listing, **kwargs)
    got = []
    for j, (x, y) in enumerate(ds):  # break off after 2 batches: the pipeline has more in flight
        got.append((x.clone(), y.clone()))
        if j == 1:
            break
    got += _run(ds, epochs=1)  # the same object continues where it stopped
    _assert_same_batches(got, reference[:6])
    ds.set_epoch(3)  # jump: the epoch-1 batches in flight are dropped
    _assert_same_batches(_run(ds, epochs=1), reference[18:24])
    ds.load_state_dict({"epoch": 1, "batches_consumed": 4})  # and back
    _assert_same_batches(_run(ds, epochs=2), reference[10:18])
    ds.close()
    _assert_same_batches(_run(ds, epochs=1), reference[18:24])  # a closed dataset starts again
    ds.close()


@pytest.mark.parametrize("augment", DALI_MODES)
def test_a_failed_dali_pipeline_is_replaced_on_the_next_iteration(tmp_path, mixed_folder, augment):
    pytest.importorskip("nvidia.dali")
    import shutil
    folder = tmp_path / "copy"
    shutil.copytree(mixed_folder, folder)
    kwargs = dict(image_size=16, batch_size=4, backend="dali", shuffle=False, augment=augment, num_threads=1)
    reference = _run_images(ProxyImages(folder, **kwargs))
    ds = ProxyImages(folder, **kwargs)
    saved = (folder / "img05.jpg").read_bytes()
    (folder / "img05.jpg").unlink()
    with pytest.raises((OSError, RuntimeError), match="img05"):
        list(ds)
    (folder / "img05.jpg").write_bytes(saved)
    ds.load_state_dict({"epoch": 0, "batches_consumed": 0})
    again = _run_images(ds)
    assert len(again) == len(reference) and all(torch.equal(a, b) for a, b in zip(again, reference))
    ds.close()


def _run_images(ds):
    return [x.clone() for x in ds]
