"""The teacher cache: what it stores, that a run reads exactly its batches' entries, and what it refuses.

A tiny run (tests/helpers/cache_run.py): 37 PNGs, two random teachers (5 and
40 classes), batches of 8. A dense fp32 cache must reproduce the online run
bitwise; a top-k cache must hold exactly the top k of the online teachers'
logits for every batch the run draws, and its loss must be the top-k loss.
"""
from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers.cache_run import TEACHERS, make_run
from helpers.terms import RegressionProbe  # noqa: F401  (registers regression_probe)
from rcfast.data import ProxyImages
from rcfast.data.plan import epoch_order, shard_indices
from rcfast.train import Consolidator, config_from_dict, read_metrics
from rcfast.train.config import ConfigError
from rcfast.train.objectives import Objective, RunLayout, StreamInfo
from rcfast.train.objectives.inputs import TeacherLayer, TeacherLogits
from rcfast.train.sparse_teacher import SparseTeacherLogits
from rcfast.train.teacher_cache import CacheError, CachedTeachers, Layout, build_teacher_cache, top_k_rows
from rcfast.train.teacher_cache import store
from rcfast.train.teachers import OnlineTeachers, TeacherRequest, load_teacher

SIZES = list(TEACHERS.values())


def _quiet(*args) -> None:
    pass


def _build(config, out, **kwargs) -> dict:
    return build_teacher_cache(config, out, progress=False, log=_quiet, **kwargs)


@pytest.fixture(scope="module", autouse=True)
def _one_thread_module():
    """Tiny models: one torch thread is fastest and (with ops on the same shapes) deterministic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The run's files, and its dense fp32 and plain top-8 (fp32 and fp16, no tail mass) caches, built once."""
    root = tmp_path_factory.mktemp("cache_run")
    with pytest.MonkeyPatch.context() as mp:  # the image scan's index stays out of $HOME
        mp.setenv("RCFAST_CACHE_DIR", str(root / "rcfast-cache"))
        data = make_run(root)
        config = config_from_dict(copy.deepcopy(data))
        caches = {"dense": _build(config, root / "dense"),
                  "top8": _build(config, root / "top8", top_k=8, dtype="fp32", tail_mass=False),
                  "top8_fp16": _build(config, root / "top8_fp16", top_k=8, tail_mass=False)}
    return root, data, caches


def _config(data: dict, **sections):
    data = copy.deepcopy(data)
    for key, value in sections.items():
        section, _, field = key.partition("__")
        if field:
            data[section][field] = value
        else:
            data[section] = value
    return config_from_dict(data)


def _dataset(config, **kwargs) -> ProxyImages:
    d = config.data
    args = dict(image_size=d.image_size, batch_size=d.batch_size, device="cpu", seed=config.train.seed,
                augment=d.augment, drop_last=d.drop_last, backend=d.backend, num_threads=d.num_threads)
    args.update(kwargs)
    return ProxyImages(d.source, **args)


def _online(config) -> OnlineTeachers:
    return OnlineTeachers({tc.name: load_teacher(tc) for tc in config.teachers},
                          num_classes={tc.name: tc.num_classes for tc in config.teachers})


def _batches(dataset, epochs: int):
    """``(epoch, batch index, images)`` of the first ``epochs`` epochs."""
    for epoch in range(epochs):
        dataset.set_epoch(epoch)
        for k, images in enumerate(dataset):
            yield epoch, k, images


def _fit(config, out: Path) -> Consolidator:
    config.train.out_dir = str(out)
    trainer = Consolidator.from_config(config)
    trainer.fit()
    trainer.close()
    return trainer


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.slow
def test_dense_fp32_cache_reproduces_the_online_run_bitwise(tiny, tmp_path):
    root, data, caches = tiny
    assert caches["dense"]["index_dtype"] is None and caches["dense"]["value_dtype"] == "fp32"
    assert caches["dense"]["bytes_per_image"] == 4 * sum(SIZES)  # the packed logits, nothing else
    _fit(_config(data), tmp_path / "online")
    cached = _fit(_config(data, teacher_cache=str(root / "dense")), tmp_path / "cached")
    assert isinstance(cached.teachers, CachedTeachers) and cached.teachers.dense
    a = torch.load(tmp_path / "online" / "final.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cached" / "final.pt", weights_only=True)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # Every logged loss (and per-head part) is the same float.
    online_log = read_metrics(tmp_path / "online" / "metrics.jsonl")
    cached_log = read_metrics(tmp_path / "cached" / "metrics.jsonl")
    assert len(online_log) == len(cached_log) == 10
    for x, y in zip(online_log, cached_log):
        assert (x["loss"], x["parts"]) == (y["loss"], y["parts"])


@pytest.mark.parametrize("cache", ["top8", "top8_fp16"])
def test_top_k_cache_holds_the_top_k_of_every_batch_the_run_draws(tiny, cache):
    root, data, _ = tiny
    config = _config(data)
    dataset = _dataset(config)
    source = CachedTeachers.for_run(_config(data, teacher_cache=str(root / cache)), dataset)
    online = _online(config)
    names = tuple(TEACHERS)
    seen = 0
    for epoch, k, images in _batches(dataset, 3):
        logits = online(TeacherRequest("proxy", 0, images, names)).logits
        out = source(TeacherRequest("proxy", 0, images, names, position=(epoch, k))).logits
        assert isinstance(out, SparseTeacherLogits) and out.values.shape == (len(images), 2, 8)
        assert out.indices.dtype == torch.int32
        small, wide = logits.split(SIZES, dim=1)
        # The 5-class teacher is whole, in class order, padded with -inf.
        assert out.indices[:, 0].tolist() == [[0, 1, 2, 3, 4, -1, -1, -1]] * len(images)
        assert torch.isneginf(out.values[:, 0, 5:]).all()
        top_values, top_indices = wide.topk(8, dim=1)
        assert torch.equal(out.indices[:, 1].long(), top_indices)
        if cache == "top8":
            assert out.values.dtype == torch.float32
            assert torch.equal(out.values[:, 0, :5], small) and torch.equal(out.values[:, 1], top_values)
        else:  # fp16 of logit - max: the softmax's input to fp16 rounding
            assert out.values.dtype == torch.float16
            for got, want in ((out.values[:, 0, :5], small), (out.values[:, 1], top_values)):
                shifted = want - want.amax(dim=1, keepdim=True)
                torch.testing.assert_close(got.float(), shifted, rtol=2 ** -11, atol=2 ** -14)
        seen += 1
    assert seen == 3 * len(dataset)


def _top_k_reference_loss(student, logits, temperatures, weights, k):
    """sum_h w_h tau_h^2 sum_j p_j (log p_j - log softmax(s_h/tau_h)[idx_j]) / B, p the softmax over the top k."""
    total, start = 0.0, 0
    for size, tau, w in zip(SIZES, temperatures, weights):
        s, t = student[:, start:start + size].double(), logits[:, start:start + size].double()
        start += size
        values, idx = t.topk(min(k, size), dim=1)
        log_p = torch.log_softmax(values / tau, dim=1)
        log_q = torch.log_softmax(s / tau, dim=1).gather(1, idx)
        total = total + w * tau * tau * (log_p.exp() * (log_p - log_q)).sum(dim=1)
    return total.mean()


def _step_and_its_online_teachers(trainer, config, online):
    """Take one training step; recompute, independently, what it saw.

    Returns ``(the step's loss values, its step inputs, the student's logits before the update, the online
    teachers' logits)`` on the images of the step's (epoch, batch), drawn again from a fresh dataset.
    """
    student_before = copy.deepcopy(trainer.student)
    _, values, _, step = trainer.train_step()
    epoch, batch = trainer.streams["proxy"].position()
    dataset = _dataset(config)
    dataset.load_state_dict({"epoch": epoch, "batches_consumed": batch})
    x = next(iter(dataset))
    logits = online(TeacherRequest("proxy", 0, x, tuple(TEACHERS))).logits
    with torch.no_grad():
        s = student_before.train()(x)
    return values, step, s, logits


def test_a_top_k_run_trains_on_the_top_k_loss(tiny, tmp_path):
    """The step's multihead_kd value from the cache is the top-k loss of the online teachers' logits."""
    root, data, _ = tiny
    config = _config(data, teacher_cache=str(root / "top8"), train__max_steps=2)
    config.train.out_dir = str(tmp_path / "run")
    trainer = Consolidator.from_config(config)
    online = _online(config)
    for _ in range(2):
        values, step, s, logits = _step_and_its_online_teachers(trainer, config, online)
        images = step[next(k for k in step.keys() if type(k).__name__ == "StudentLogits")]
        want = _top_k_reference_loss(s, logits, [2.0, 4.0], [1.0, 0.5], 8)
        assert float(values["multihead_kd"]) == pytest.approx(float(want), rel=1e-5)
        assert images.shape == s.shape
    trainer.close()


def test_ranks_read_their_own_samples(tiny, tmp_path):
    """Shard 1 of 2: a cache built for 2 ranks gives that rank's batches bitwise, one built for 1 rank to rounding."""
    root, data, _ = tiny
    config = _config(data)
    two = _build(config, tmp_path / "two", num_shards=2, epochs=3)
    assert two["chunks_built"] == 2 * 3  # one chunk per (epoch, shard)
    dataset = _dataset(config, shard_id=1, num_shards=2)
    online = _online(config)
    names = tuple(TEACHERS)
    sources = {name: CachedTeachers(path, dataset, epochs=range(3))
               for name, path in (("two", tmp_path / "two"), ("one", root / "dense"))}
    for epoch, k, images in _batches(dataset, 3):
        want = online(TeacherRequest("proxy", 0, images, names)).logits
        got = {n: s(TeacherRequest("proxy", 0, images, names, position=(epoch, k))).logits for n, s in sources.items()}
        assert torch.equal(got["two"], want)
        torch.testing.assert_close(got["one"], want, rtol=1e-5, atol=1e-5)
        # the teachers asked for in another order and alone: the same columns
        wide = sources["two"](TeacherRequest("proxy", 0, images, ("wide",), position=(epoch, k))).logits
        assert torch.equal(wide, want[:, 5:])


# ---------------------------------------------------------------------------------------------- refusals
def _changed_run(root: Path, data: dict, change: str) -> dict:
    data = copy.deepcopy(data)
    if change == "seed":
        data["train"]["seed"] = 4
    elif change == "augment":
        data["data"]["augment"] = "center"
    elif change == "image_size":
        data["data"]["image_size"] = 12
    elif change == "precision":
        data["train"]["precision"] = "bf16"
    elif change == "teacher_order":
        data["teachers"] = data["teachers"][::-1]
        data["objective"][0]["heads"] = None
    elif change == "teacher_builder":
        data["teachers"][1]["builder_kwargs"] = {"width": 4, "norm": "group"}
    elif change == "teacher_file":
        weights = torch.load(data["teachers"][1]["checkpoint"], weights_only=True)
        weights["heads.bias"] = weights["heads.bias"] + 1e-3
        path = root / "wide_changed.pt"
        torch.save(weights, path)
        data["teachers"][1]["checkpoint"] = str(path)
    elif change in ("data_file", "data_added"):
        images = root / f"images_{change}"
        if not images.exists():
            shutil.copytree(data["data"]["source"], images)
            if change == "data_file":
                os.utime(images / "005.png", ns=(0, 10**18))  # same bytes, other modification time
            else:
                shutil.copy(images / "000.png", images / "100.png")
        data["data"]["source"] = str(images)
    else:
        raise AssertionError(change)
    return data


@pytest.mark.parametrize("change, named", [
    ("seed", "train.seed"), ("augment", "data.augment"), ("image_size", "data.image_size"),
    ("precision", "train.precision"), ("teacher_order", "teachers (names and order)"),
    ("teacher_builder", "teachers[1].builder_kwargs"), ("teacher_file", "teachers[1].checkpoint"),
    ("data_file", "data.source"), ("data_added", "data.source"),
])
def test_a_cache_of_another_run_is_refused_naming_the_field(tiny, change, named):
    root, data, _ = tiny
    changed = _changed_run(root, data, change)
    changed["teacher_cache"] = str(root / "top8")
    config = config_from_dict(changed)
    with pytest.raises(CacheError, match="does not match this run") as info:
        CachedTeachers.for_run(config, _dataset(config))
    assert named in str(info.value)


def test_a_cache_with_fewer_epochs_than_the_run_reads_is_refused(tiny):
    root, data, caches = tiny
    assert caches["top8"]["epochs"] == 3  # 10 steps of 4 batches per epoch
    config = _config(data, teacher_cache=str(root / "top8"), train__max_steps=13)
    with pytest.raises(CacheError, match=r"holds 3 epoch\(s\), but this run reads 4.*--epochs 4"):
        CachedTeachers.for_run(config, _dataset(config))
    # before training: from_config refuses it too
    with pytest.raises(CacheError, match="reads 4"):
        Consolidator.from_config(config)


def test_the_cli_reports_a_refused_cache_in_one_line(tiny, tmp_path, capsys):
    from helpers.cache_run import write_config
    from rcfast.cli import main

    root, data, _ = tiny
    changed = _changed_run(root, data, "seed")
    changed["teacher_cache"] = str(root / "top8")
    changed["train"]["out_dir"] = str(tmp_path / "run")
    assert main(["consolidate", "--config", str(write_config(tmp_path / "run.yaml", changed))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rcfast: error: teacher cache") and "train.seed" in err and "is 3 in the cache" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_terms_a_top_k_cache_cannot_serve_are_refused_before_training(tiny, tmp_path):
    root, data, _ = tiny
    # regression_probe regresses dense teacher logits: a top-k cache cannot serve it (not even the teacher
    # it holds whole: its fp16 values are shifted logits, which only a softmax ignores)
    for teacher in ("small", "wide"):
        config = _config(data, teacher_cache=str(root / "top8_fp16"),
                         objective=data["objective"] + [{"term": "regression_probe", "teacher": teacher}])
        config.train.out_dir = str(tmp_path / teacher)
        with pytest.raises(ConfigError, match=rf"dense logits of teachers \['{teacher}'\].*top 8 only"):
            Consolidator.from_config(config)
    # a dense cache serves it
    config = _config(data, teacher_cache=str(root / "dense"),
                     objective=data["objective"] + [{"term": "regression_probe", "teacher": "wide"}])
    config.train.out_dir = str(tmp_path / "dense")
    Consolidator.from_config(config).close()
    # teacher layers and other streams: never
    source = CachedTeachers(root / "top8", _dataset(_config(data)))
    with pytest.raises(ConfigError, match="holds logits only"):
        source.check_inputs([TeacherLayer("proxy", "small", "body.0")])
    with pytest.raises(ConfigError, match="on the data stream 'task'"):
        source.check_inputs([TeacherLogits("task", ("small",), accepts_top_k=True)])


def test_teacher_cache_config_needs_teachers_and_data(tiny):
    _, data, _ = tiny
    with pytest.raises(ConfigError, match="teacher_cache needs the run's teachers and data.source"):
        _config(data, teacher_cache="somewhere", data__source="")


# ---------------------------------------------------------------------------------------------- damage
def _copy_cache(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_truncated_corrupt_or_unrecorded_chunks_are_errors_naming_the_file(tiny, tmp_path):
    root, data, _ = tiny
    config = _config(data)
    chunk = Path("epoch_00001") / "shard_0000_chunk_00000.bin"

    truncated = _copy_cache(root / "top8", tmp_path / "truncated")
    with open(truncated / chunk, "r+b") as f:
        f.truncate((truncated / chunk).stat().st_size - 3)
    with pytest.raises(CacheError, match=rf"{truncated / chunk} is \d+ bytes but must be \d+"):
        CachedTeachers(truncated, _dataset(config), epochs=range(3))  # before training

    unrecorded = _copy_cache(root / "top8", tmp_path / "unrecorded")
    (unrecorded / chunk).with_suffix(".json").unlink()
    with pytest.raises(CacheError, match=rf"{unrecorded / chunk} has no record"):
        CachedTeachers(unrecorded, _dataset(config), epochs=range(3))

    corrupt = _copy_cache(root / "top8", tmp_path / "corrupt")
    raw = bytearray((corrupt / chunk).read_bytes())
    raw[17] ^= 0x40  # one flipped bit, same size: found by the checksum when the chunk is first read
    (corrupt / chunk).write_bytes(bytes(raw))
    dataset = _dataset(config)
    source = CachedTeachers(corrupt, dataset, epochs=range(3))
    images = torch.zeros(8, 3, 16, 16)
    source(TeacherRequest("proxy", 0, images, tuple(TEACHERS), position=(0, 0)))  # epoch 0 is intact
    with pytest.raises(CacheError, match=rf"{corrupt / chunk} is corrupt: its sha256 differs"):
        source(TeacherRequest("proxy", 0, images, tuple(TEACHERS), position=(1, 0)))

    missing = _copy_cache(root / "top8", tmp_path / "missing")
    (missing / chunk).unlink()
    with pytest.raises(CacheError, match=rf"{missing / chunk} is missing"):
        CachedTeachers(missing, _dataset(config), epochs=range(3))


@pytest.mark.parametrize("damage, message", [
    ("absent", "has no manifest.json"), ("not json", "is not valid JSON"), ("format", "is not a teacher cache"),
    ("epochs", "epochs must be a positive integer"), ("layout", "layout must have exactly the keys"),
    ("row_width", "does not fit a top-8 cache"),
])
def test_a_damaged_manifest_is_an_error(tiny, tmp_path, damage, message):
    root, data, _ = tiny
    cache = _copy_cache(root / "top8", tmp_path / "cache")
    manifest_path = cache / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    if damage == "absent":
        manifest_path.unlink()
    elif damage == "not json":
        manifest_path.write_text("{")
    else:
        if damage == "format":
            manifest["format"] = "something/1"
        elif damage == "epochs":
            manifest["epochs"] = -1
        elif damage == "layout":
            manifest["layout"]["extra"] = 1
        elif damage == "row_width":
            manifest["layout"]["row_width"] += 1
        manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=message):
        CachedTeachers(cache, _dataset(_config(data)))


# ---------------------------------------------------------------------------------------------- building
def _cache_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".")}


def test_an_interrupted_build_resumes_to_the_same_files(tiny, tmp_path, monkeypatch):
    root, data, _ = tiny
    config = _config(data)
    reference = _build(config, tmp_path / "reference", top_k=8, chunk_batches=2)
    assert reference["chunks_built"] == 3 * 3  # 5 batches (37 images, no batch dropped) per epoch: 2 + 2 + 1

    real_write = store.write_chunk
    calls = []

    def crash_on_fourth(*args, **kwargs):
        calls.append(args[2:5])
        if len(calls) == 4:
            raise KeyboardInterrupt("killed")
        return real_write(*args, **kwargs)

    monkeypatch.setattr("rcfast.train.teacher_cache.build.write_chunk", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        _build(config, tmp_path / "resumed", top_k=8, chunk_batches=2)
    monkeypatch.undo()
    # A data file without its record and a stale temporary file, as a kill mid-write leaves them:
    leftover = Layout.chunk_path(tmp_path / "resumed", *calls[3])
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half a chunk")
    (leftover.parent / f".{leftover.name}.tmp-12345").write_bytes(b"torn")
    resumed = _build(config, tmp_path / "resumed", top_k=8, chunk_batches=2)
    assert (resumed["chunks_reused"], resumed["chunks_built"]) == (3, 6)
    assert _cache_files(tmp_path / "resumed") == _cache_files(tmp_path / "reference")
    assert not list((tmp_path / "resumed").rglob("*.tmp-*"))
    # a third build finds every chunk complete and verified: nothing to do
    again = _build(config, tmp_path / "resumed", top_k=8, chunk_batches=2)
    assert (again["chunks_reused"], again["chunks_built"]) == (9, 0)


def test_a_build_rebuilds_a_corrupt_chunk_and_extends_epochs(tiny, tmp_path):
    root, data, _ = tiny
    config = _config(data)
    cache = _copy_cache(root / "top8", tmp_path / "cache")
    chunk = cache / "epoch_00002" / "shard_0000_chunk_00000.bin"
    good = chunk.read_bytes()
    chunk.write_bytes(bytes(len(good)))  # same size, zeros
    summary = _build(config, cache, top_k=8, dtype="fp32", epochs=4, tail_mass=False)
    assert (summary["epochs"], summary["chunks_built"], summary["chunks_reused"]) == (4, 2, 2)
    assert chunk.read_bytes() == good
    assert json.loads((cache / "manifest.json").read_text())["epochs"] == 4


@pytest.mark.parametrize("change, message", [
    ({"top_k": 4}, "top_k=8"), ({"dtype": "bf16"}, "value_dtype='fp32'"), ({"num_shards": 2}, "num_shards=1"),
    ({"tail_mass": True}, "tail_temperatures=None"),
])
def test_a_build_into_a_cache_of_other_settings_is_refused(tiny, change, message):
    root, data, _ = tiny
    kwargs = {"top_k": 8, "dtype": "fp32", "tail_mass": False, **change}
    with pytest.raises(CacheError, match=message):
        _build(_config(data), root / "top8", **kwargs)


def test_a_build_into_a_cache_of_another_run_is_refused(tiny):
    root, data, _ = tiny
    with pytest.raises(CacheError, match="train.seed"):
        _build(_config(data, train__seed=5), root / "top8", top_k=8, dtype="fp32", tail_mass=False)


def test_two_builds_of_one_shard_cannot_run_at_once(tmp_path):
    from rcfast.train.teacher_cache.build import _shard_lock

    with _shard_lock(tmp_path, 0):
        with pytest.raises(CacheError, match="another cache-teachers process is building shard 0"):
            with _shard_lock(tmp_path, 0):
                pass
        with _shard_lock(tmp_path, 1):  # another shard is free
            pass


def test_build_arguments_are_checked(tiny, tmp_path):
    _, data, _ = tiny
    config = _config(data)
    for kwargs, message in (({"top_k": 0}, "top_k"), ({"dtype": "int8"}, "dtype"), ({"epochs": 0}, "epochs"),
                            ({"num_shards": 0}, "num_shards")):
        with pytest.raises(ValueError, match=message):
            _build(config, tmp_path / "x", **kwargs)
    with pytest.raises(ConfigError, match="no teachers"):
        _build(_config(data, teachers=[], objective=[{"term": "cross_entropy", "head": "t"}],
                       tasks=[{"name": "t", "source": data["data"]["source"], "num_classes": 2}],
                       data__source=""), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_the_cli_builds_a_cache(tiny, tmp_path, capsys):
    from helpers.cache_run import write_config
    from rcfast.cli import main

    _, data, _ = tiny
    changed = copy.deepcopy(data)
    changed["train"]["max_steps"] = 4  # one epoch
    changed["train"]["progress"] = False
    config = write_config(tmp_path / "run.yaml", changed)
    assert main(["cache-teachers", "--config", str(config), "--top-k", "8", "--no-tail-mass",
                 "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[:out.rindex("}") + 1])
    assert (summary["epochs"], summary["top_k"], summary["value_dtype"], summary["index_dtype"]) == (1, 8, "fp16",
                                                                                                  "int16")
    assert summary["bytes_per_image"] == 2 * 8 * (2 + 2) and summary["tail_temperatures"] is None
    assert f"--set teacher_cache={tmp_path / 'c'}" in out
    assert main(["cache-teachers", "--config", str(config), "--top-k", "0", "--out", str(tmp_path / "d")]) == 2
    assert "top_k must be a positive integer" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- units
@settings(max_examples=60, deadline=None)
@given(num_images=st.integers(1, 60), num_shards=st.integers(1, 5), batch_size=st.integers(1, 7),
       chunk_batches=st.integers(1, 4), shuffle=st.booleans(), epoch=st.integers(0, 3))
def test_every_sample_is_where_its_build_shard_wrote_it(num_images, num_shards, batch_size, chunk_batches, shuffle,
                                                        epoch):
    if num_shards > num_images:
        return
    layout = Layout(num_images=num_images, num_shards=num_shards, batch_size=batch_size, chunk_batches=chunk_batches,
                    row_width=3, value_dtype="fp32", index_dtype=None, seed=11, shuffle=shuffle)
    order = epoch_order(num_images, 11, epoch, shuffle)
    written = {}
    for shard in range(num_shards):
        # what the build writes: the shard's images in delivery order, chunk after chunk
        delivered = shard_indices(order, shard, num_shards, drop_last=False)
        assert len(delivered) == layout.shard_rows(shard)
        assert sum(layout.chunk_rows(shard, c) for c in range(layout.num_chunks(shard))) == len(delivered)
        for p, sample in enumerate(delivered):
            written[int(sample)] = (shard, p // layout.rows_per_chunk, p % layout.rows_per_chunk)
    assert sorted(written) == list(range(num_images))
    shard, chunk, row = layout.locate(layout.inverse_order(epoch), np.arange(num_images))
    assert [written[i] for i in range(num_images)] == list(zip(shard.tolist(), chunk.tolist(), row.tolist()))


def test_top_k_rows_edge_cases():
    logits = torch.tensor([[1.0, 5.0, 3.0, float("-inf"), 2.0, 0.5]])
    values, indices = top_k_rows(logits, [4, 2], 3, "fp32")
    assert indices.dtype == np.int16 and indices.tolist() == [[1, 2, 0, 0, 1, -1]]
    assert values.tolist() == [[5.0, 3.0, 1.0, 2.0, 0.5, float("-inf")]]
    values, indices = top_k_rows(logits, [4, 2], 4, "bf16")  # dense: the packed logits themselves
    assert indices is None and values.dtype == np.uint16
    as_float = torch.from_numpy(values.view(np.int16)).view(torch.bfloat16).float()
    assert as_float.tolist() == logits.tolist()
    values, _ = top_k_rows(logits, [4, 2], 3, "bf16")  # top-k in bf16: minus each (sample, teacher)'s max
    as_float = torch.from_numpy(values.view(np.int16)).view(torch.bfloat16).float()
    assert as_float.tolist() == [[0.0, -2.0, -4.0, 0.0, -1.5, float("-inf")]]
    # more classes than int16 indexes
    wide = torch.zeros(1, 40000)
    wide[0, 39999] = 1
    _, indices = top_k_rows(wide, [40000], 2, "fp16")
    assert indices.dtype == np.int32 and indices[0, 0] == 39999
    # errors name the teacher and the sample
    with pytest.raises(ValueError, match="teacher 'b' gives NaN.*for image x.png"):
        top_k_rows(torch.tensor([[0.0, 1.0, float("nan")]]), [1, 2], 1, "fp32", lambda row: "image x.png", ["a", "b"])
    with pytest.raises(ValueError, match="only -inf"):
        top_k_rows(torch.full((1, 2), float("-inf")), [2], 1, "fp32")
    with pytest.raises(ValueError, match=r"do not fit fp16 \(a difference to the largest.*--dtype bf16 or fp32"):
        top_k_rows(torch.tensor([[0.0, 1e5, -3e5]]), [3], 2, "fp16")
    with pytest.raises(ValueError, match=r"do not fit fp16 \(a logit of magnitude 1e\+05"):
        top_k_rows(torch.tensor([[0.0, 1e5, 3.0]]), [3], 3, "fp16")
    values, _ = top_k_rows(torch.tensor([[0.0, 1e5, 1e5 - 10]]), [3], 2, "fp16")  # top-k: differences must fit
    assert values.tolist() == [[0.0, -10.0]]


def test_sparse_teacher_logits_select_and_densify():
    values = torch.tensor([[[2.0, 1.0, float("-inf")], [0.5, 0.0, -1.0]]])
    indices = torch.tensor([[[1, 0, -1], [3, 0, 2]]], dtype=torch.int32)
    sparse = SparseTeacherLogits(values, indices, ("a", "b"), {"a": 2, "b": 4})
    assert sparse.splits == [2, 4] and sparse.top_k == 3
    inf = float("-inf")
    assert sparse.to_dense().tolist() == [[1.0, 2.0, 0.0, inf, -1.0, 0.5]]
    b_only = sparse.select(("b",))
    assert b_only.teachers == ("b",) and torch.equal(b_only.values, values[:, 1:])
    swapped = sparse.select(("b", "a"))
    assert swapped.to_dense().tolist() == [[0.0, inf, -1.0, 0.5, 1.0, 2.0]]
    with pytest.raises(KeyError, match="teacher"):
        sparse.select(("c",))
    with pytest.raises(ValueError, match=r"\[B, T, k\]"):
        SparseTeacherLogits(values, indices[:, :1], ("a", "b"), {"a": 2, "b": 4})


def test_the_top_k_loss_through_the_term_equals_the_dense_loss_at_full_k():
    """multihead_kd on a SparseTeacherLogits holding every class is the dense loss (indices in any order)."""
    from rcfast.train.objectives.inputs import StepInputs, StudentLogits

    objective = Objective.from_specs([{"term": "multihead_kd", "temperature": {"a": 2.0, "b": 3.0}}])
    layout = RunLayout(heads={"a": 3, "b": 5}, teachers={"a": 3, "b": 5}, streams={"proxy": StreamInfo(False)})
    keys = objective.bind(layout)
    gen = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(4, 8, generator=gen), torch.randn(4, 8, generator=gen)
    perm = [torch.randperm(c, generator=gen) for c in (3, 5)]
    values = torch.full((4, 2, 5), float("-inf"))
    indices = torch.full((4, 2, 5), -1, dtype=torch.int32)
    for h, (start, size) in enumerate(((0, 3), (3, 5))):
        values[:, h, :size] = teacher[:, start:start + size][:, perm[h]]
        indices[:, h, :size] = perm[h].to(torch.int32)
    sparse = SparseTeacherLogits(values, indices, ("a", "b"), {"a": 3, "b": 5})
    dense_step = StepInputs(0, {keys[0]: student, keys[1]: teacher})
    sparse_step = StepInputs(0, {keys[0]: student, keys[1]: sparse})
    dense_loss, _ = objective(dense_step)
    sparse_loss, _ = objective(sparse_step)
    torch.testing.assert_close(sparse_loss, dense_loss)
    for head, value in objective.parts(sparse_step)["multihead_kd"].items():
        torch.testing.assert_close(value, objective.parts(dense_step)["multihead_kd"][head])
    assert isinstance(keys[1], TeacherLogits) and keys[1].accepts_top_k
    assert math.isfinite(float(sparse_loss))


def _top_k_kd_by_hand(student, values, indices, sizes, temperatures, weights):
    """The top-k KD loss written out per head: ``sum_h w_h tau_h^2 sum_j p_j (log p_j - log q[idx_j])``, batch mean.

    ``p`` is the softmax of the head's non-padding values over its k entries; ``q``
    the student's softmax over all the head's classes.
    """
    total, start = 0.0, 0
    for h, (size, tau, w) in enumerate(zip(sizes, temperatures, weights)):
        log_q = torch.log_softmax(student[:, start:start + size] / tau, dim=1)
        start += size
        v = values[:, h].float() / tau
        entry = ~torch.isneginf(v)
        log_p = torch.log_softmax(v, dim=1)
        gathered = log_q.gather(1, torch.where(entry, indices[:, h].long(), 0))
        kl = torch.where(entry, log_p.exp() * (log_p - gathered), 0.0).sum(dim=1)
        total = total + w * tau ** 2 * kl
    return total.sum() / student.shape[0]


def test_the_top_k_term_is_the_top_k_loss_with_padding_and_fp16_values():
    """multihead_kd on top-k teachers as a top-k cache stores them (fp16 ``logit - max``, -inf/-1 padding for a
    head with fewer classes than k) computes the top-k loss and its gradient, whichever op it goes through."""
    from rcfast.train.objectives.inputs import StepInputs

    sizes, k, batch = {"a": 12, "b": 3, "c": 40}, 5, 7
    temperatures, weights = {"a": 2.0, "b": 1.0, "c": 4.0}, {"a": 1.0, "b": 0.5, "c": 2.0}
    objective = Objective.from_specs([{"term": "multihead_kd", "temperature": temperatures,
                                       "head_weights": weights}])
    layout = RunLayout(heads=sizes, teachers=sizes, streams={"proxy": StreamInfo(False)})
    keys = objective.bind(layout)
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(batch, sum(sizes.values()), generator=gen) * 3
    values, indices = top_k_rows(teacher, list(sizes.values()), k, "fp16")
    values = torch.from_numpy(values).view(batch, 3, k)
    indices = torch.from_numpy(indices).view(batch, 3, k).to(torch.int32)
    assert torch.isneginf(values[:, 1, 3:]).all() and (indices[:, 1, 3:] == -1).all()
    sparse = SparseTeacherLogits(values, indices, tuple(sizes), sizes)
    student = torch.randn(batch, sum(sizes.values()), generator=gen, requires_grad=True)
    loss, _ = objective(StepInputs(0, {keys[0]: student, keys[1]: sparse}))
    (grad,) = torch.autograd.grad(loss, student)
    expected = _top_k_kd_by_hand(student, values, indices, list(sizes.values()), list(temperatures.values()),
                                 list(weights.values()))
    (expected_grad,) = torch.autograd.grad(expected, student)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-7)
    # Top-k loses mass: the loss differs from the dense one on the same teacher.
    dense_loss, _ = objective(StepInputs(0, {keys[0]: student, keys[1]: teacher}))
    assert abs(float(dense_loss.detach()) - float(loss.detach())) > 1e-3


# ---------------------------------------------------------------------------------------------- tail mass
def _tail_target(block: torch.Tensor, k: int, tau: float) -> torch.Tensor:
    """What a tail-mass cache's teacher is, in float64: the exact top-k probabilities, the rest spread evenly."""
    p = torch.softmax(block.double() / tau, dim=1)
    if block.shape[1] <= k:
        return p
    top = p.topk(k, dim=1)
    tail = (1 - top.values.sum(dim=1, keepdim=True)) / (block.shape[1] - k)
    return tail.expand_as(p).clone().scatter_(1, top.indices, top.values)


@pytest.mark.parametrize("value_dtype, tol", [("fp32", 1e-6), ("fp16", 2e-3), ("bf16", 1e-2)])
def test_tail_fill_keeps_the_top_k_probabilities_and_the_tail_mass(value_dtype, tol):
    """Densified at its temperature, a tail-mass row is the teacher's top-k probabilities plus its tail spread
    evenly: on heads with fewer, as many as, one more and many more classes than k, -inf classes, sharp and
    flat teachers."""
    gen = torch.Generator().manual_seed(0)
    sizes, k, taus = [3, 5, 6, 50], 5, [1.0, 2.0, 4.0, 0.5]
    logits = torch.randn(9, sum(sizes), generator=gen) * torch.tensor([0.1, 1, 5, 30]).repeat_interleave(
        torch.tensor([3, 3, 2, 1]))[:, None]
    logits[0, 20] = float("-inf")  # a masked class of the 50-class teacher
    values, indices = top_k_rows(logits, sizes, k, value_dtype, tail_temperatures=taus)
    assert values.shape == indices.shape == (9, 4 * (k + 1))
    vals = store.values_to_torch(values, value_dtype).float().view(9, 4, k + 1)
    idx = torch.from_numpy(indices).view(9, 4, k + 1)
    assert (idx[..., k] == -1).all()  # the fill entry has no class
    assert torch.isneginf(vals[:, :2, k]).all()  # teachers stored whole have no tail
    assert (vals[:, 2:, k] <= vals[:, 2:, k - 1]).all()  # the fill is never above the k entries
    sparse = SparseTeacherLogits(vals[..., :k], idx[..., :k].to(torch.int32), ("a", "b", "c", "d"),
                                 dict(zip("abcd", sizes)), vals[..., k])
    dense = sparse.to_dense()
    for block, got, size, tau in zip(logits.split(sizes, 1), dense.split(sizes, 1), sizes, taus):
        want = _tail_target(block, k, tau)
        torch.testing.assert_close(torch.softmax(got.double() / tau, dim=1), want, rtol=0, atol=tol)


def test_tail_fill_at_the_edges_of_the_range():
    """A tail that underflows is -inf, not an error; a tail far below the top in fp16 rounds to -inf; a tail only
    the -inf classes make is -inf; a dense cache takes no tail."""
    logits = torch.tensor([[0.0, -3.0, -1e5, -1e5], [0.0, 1.0, float("-inf"), float("-inf")]])
    values, _ = top_k_rows(logits, [4], 2, "fp16", tail_temperatures=[1.0])
    fill = store.values_to_torch(values, "fp16").float()[:, 2]
    assert torch.isneginf(fill[1])  # its classes outside the top 2 are -inf: no mass
    assert fill[0] < -6e4 or torch.isneginf(fill[0])
    values, _ = top_k_rows(logits[:1], [4], 2, "fp32", tail_temperatures=[1.0])
    assert values[0, 2] == pytest.approx(-1e5, rel=1e-6)  # fp32 keeps it: tau * (logsumexp - log 2)
    with pytest.raises(ValueError, match="tail_temperatures needs a top-k cache"):
        top_k_rows(logits, [4], 4, "fp32", tail_temperatures=[1.0])
    with pytest.raises(ValueError, match="one temperature per teacher"):
        top_k_rows(logits, [2, 2], 1, "fp32", tail_temperatures=[1.0])


def test_sparse_teacher_logits_with_a_fill():
    values = torch.tensor([[[2.0, 1.0], [0.5, float("-inf")]]])
    indices = torch.tensor([[[1, 0], [2, -1]]], dtype=torch.int32)
    sparse = SparseTeacherLogits(values, indices, ("a", "b"), {"a": 3, "b": 4}, torch.tensor([[-1.0, -2.0]]))
    assert sparse.to_dense().tolist() == [[1.0, 2.0, -1.0, -2.0, -2.0, 0.5, -2.0]]
    b_only = sparse.select(("b",))
    assert b_only.fill.tolist() == [[-2.0]] and b_only.to_dense().tolist() == [[-2.0, -2.0, 0.5, -2.0]]
    assert sparse.select(("b", "a")).fill.tolist() == [[-2.0, -1.0]]
    with pytest.raises(ValueError, match=r"fill must be \[B, T\]"):
        SparseTeacherLogits(values, indices, ("a", "b"), {"a": 3, "b": 4}, torch.zeros(1, 3))


@pytest.fixture(scope="module")
def tail_cache(tiny):
    root, data, _ = tiny
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RCFAST_CACHE_DIR", str(root / "rcfast-cache"))
        summary = _build(_config(data), root / "top8_tail", top_k=8, dtype="fp32", tail_mass=True)
    return root / "top8_tail", summary


def test_a_tail_mass_run_trains_on_the_teacher_with_its_tail(tiny, tail_cache, tmp_path):
    """The step's multihead_kd value from a tail-mass cache is the KL to the online teachers' top-k probabilities
    plus their tail spread evenly (computed here from the online logits, in float64)."""
    root, data, _ = tiny
    cache, summary = tail_cache
    assert summary["tail_temperatures"] == [2.0, 4.0] and summary["bytes_per_image"] == 2 * 9 * (4 + 2)
    config = _config(data, teacher_cache=str(cache), train__max_steps=2)
    config.train.out_dir = str(tmp_path / "run")
    trainer = Consolidator.from_config(config)
    assert "top-8 + tail" in repr(trainer.teachers)
    online = _online(config)
    for _ in range(2):
        values, _, s, logits = _step_and_its_online_teachers(trainer, config, online)
        s = s.double()
        want, start = 0.0, 0
        for size, tau, w in zip(SIZES, [2.0, 4.0], [1.0, 0.5]):
            p = _tail_target(logits[:, start:start + size], 8, tau)
            log_q = torch.log_softmax(s[:, start:start + size] / tau, dim=1)
            start += size
            want = want + w * tau * tau * (p * (p.log() - log_q)).sum(dim=1)
        assert float(values["multihead_kd"]) == pytest.approx(float(want.mean()), rel=1e-5)
    trainer.close()
    # Not the renormalised top-k loss: the tail moves it.
    plain = _config(data, teacher_cache=str(root / "top8"), train__max_steps=1)
    plain.train.out_dir = str(tmp_path / "plain")
    with_tail = _config(data, teacher_cache=str(cache), train__max_steps=1)
    with_tail.train.out_dir = str(tmp_path / "tail")
    losses = []
    for c in (plain, with_tail):
        t = Consolidator.from_config(c)
        losses.append(float(t.train_step()[1]["multihead_kd"]))
        t.close()
    assert abs(losses[0] - losses[1]) > 1e-3 * abs(losses[1])


def test_a_tail_mass_cache_serves_its_temperature_only(tiny, tail_cache, tmp_path):
    root, data, _ = tiny
    cache, _ = tail_cache
    objective = [{**data["objective"][0], "temperature": {"small": 2.0, "wide": 3.0}}]
    config = _config(data, teacher_cache=str(cache), objective=objective)
    config.train.out_dir = str(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"keeps teacher 'wide'.s tail mass at temperature 4.0, but an objective "
                                          r"term reads it at 3.0"):
        Consolidator.from_config(config)
    # the same config's plain top-k cache serves any temperature
    config = _config(data, teacher_cache=str(root / "top8"), objective=objective)
    config.train.out_dir = str(tmp_path / "plain")
    Consolidator.from_config(config).close()


def test_tail_mass_temperatures_come_from_the_objective(tiny, tmp_path):
    from rcfast.train.teacher_cache import top_k_temperatures

    root, data, _ = tiny
    assert top_k_temperatures(_config(data)) == [2.0, 4.0]
    assert top_k_temperatures(_config(data, objective=[{"term": "multihead_kd"}])) == [4.0, 4.0]
    twice = [{"term": "multihead_kd", "name": "kd2", "heads": ["wide"], "temperature": 2.0},
             {"term": "multihead_kd", "name": "kd4", "temperature": 4.0}]
    with pytest.raises(ConfigError, match=r"reads teacher 'wide' at temperatures 2.0 and 4.0"):
        top_k_temperatures(_config(data, objective=twice))
    dense_only = [{"term": "multihead_kd", "heads": ["small"]}, {"term": "regression_probe", "teacher": "wide"}]
    with pytest.raises(ConfigError, match=r"the default for a top-k cache\): no objective term reads the top-k "
                                          r"logits of teacher\(s\) \['wide'\].*--no-tail-mass"):
        _build(_config(data, objective=dense_only), tmp_path / "dense_only", top_k=8)
    with pytest.raises(TypeError, match="tail_mass must be True, False or None"):
        _build(_config(data), tmp_path / "bad", top_k=8, tail_mass="yes")
    messages = []
    summary = build_teacher_cache(_config(data, train__max_steps=4), tmp_path / "dense", tail_mass=True,
                                  progress=False, log=messages.append)
    assert summary["tail_temperatures"] is None and "nothing to add" in messages[0]


def test_a_cache_from_before_the_tail_mass_still_reads(tiny, tmp_path):
    """Manifests written before storage.tail_temperatures existed read as caches without a tail."""
    root, data, _ = tiny
    cache = _copy_cache(root / "top8", tmp_path / "old")
    manifest = json.loads((cache / "manifest.json").read_text())
    del manifest["storage"]["tail_temperatures"]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    source = CachedTeachers(cache, _dataset(_config(data)), epochs=[0])
    assert source.tail_temperatures is None
    manifest["storage"]["tail_temperatures"] = [2.0]  # one per teacher, or null
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="tail_temperatures must be null or one temperature > 0 per teacher"):
        CachedTeachers(cache, _dataset(_config(data)))
    manifest["storage"]["tail_temperatures"] = [2.0, 4.0]  # a tail changes the row width: the layout must agree
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="does not fit a top-8 cache"):
        CachedTeachers(cache, _dataset(_config(data)))


def test_the_cli_builds_a_top_k_cache_with_its_tail_mass_by_default(tiny, tmp_path, capsys):
    from helpers.cache_run import write_config
    from rcfast.cli import main

    _, data, _ = tiny
    changed = copy.deepcopy(data)
    changed["train"]["max_steps"] = 4
    config = write_config(tmp_path / "run.yaml", changed)
    assert main(["cache-teachers", "--config", str(config), "--top-k", "8", "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[:out.rindex("}") + 1])
    assert summary["tail_temperatures"] == [2.0, 4.0] and summary["bytes_per_image"] == 2 * 9 * (2 + 2)
    # a tail-mass build into a plain cache's folder is refused
    assert main(["cache-teachers", "--config", str(config), "--top-k", "8", "--out", str(tmp_path / "c"),
                 "--no-tail-mass"]) == 2
    assert "tail_temperatures=[2.0, 4.0]" in capsys.readouterr().err


@pytest.mark.parametrize("cache", ["top8", "top8_tail"])
def test_the_fused_linear_term_trains_from_a_top_k_cache_as_the_unfused_one(tiny, tail_cache, tmp_path, cache):
    """multihead_kd with fused_linear densifies a top-k teacher (-inf, or the tail's fill, outside the k): the
    same losses and weights as the unfused term reading the same cache, to float rounding."""
    root, data, _ = tiny
    path = tail_cache[0] if cache == "top8_tail" else root / "top8"
    runs = {}
    for fused in (False, True):
        config = _config(data, teacher_cache=str(path), train__max_steps=3,
                         objective=[{**data["objective"][0], "fused_linear": fused}])
        config.train.out_dir = str(tmp_path / f"fused_{fused}")
        trainer = Consolidator.from_config(config)
        losses = [float(trainer.train_step()[1]["multihead_kd"]) for _ in range(3)]
        runs[fused] = (losses, {k: v.clone() for k, v in trainer.student.state_dict().items()})
        trainer.close()
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for name, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], value, rtol=1e-4, atol=1e-5)
