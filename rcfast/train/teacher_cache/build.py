"""``rcfast cache-teachers``: run a run's teachers once over the exact images it will see, and store their top-k logits.

For each epoch and each build shard (``num_shards``, default: the ``torchrun``
world size, else 1), the run's data pipeline is iterated exactly as a run with
that many ranks iterates it -- same ``ProxyImages`` settings, same batches --
except that no partial batch is dropped, so every image of every epoch is
covered. The teachers run on each batch as :class:`~rcfast.train.teachers.OnlineTeachers`
runs them in training (``eval()``, ``inference_mode``, the run's autocast), so
a run with the build's batch size and rank count gets bitwise the logits it
would have computed; any other run gets the same teachers on the same images.

Each (epoch, sample, teacher) keeps its top-k logits and their class indices
and, by default, the fill logit of its tail mass (:func:`top_k_rows`). Chunks are written atomically and a rebuild skips every
chunk that is complete and verifies (size + sha256), so a killed build resumes
where it stopped. Under ``torchrun`` each rank builds the shards ``s`` with
``s % world_size == rank``.
"""
from __future__ import annotations

import contextlib
import fcntl
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from rcfast.data.plan import num_batches
from rcfast.train.config import ConfigError, RunConfig
from rcfast.train.distributed import setup_distributed
from rcfast.train.objectives.inputs import TeacherLogits
from rcfast.train.teacher_cache.manifest import check_pins, read_manifest, row_width, run_pins, write_manifest
from rcfast.train.teacher_cache.store import (INDEX_DTYPES, VALUE_DTYPES, CacheError, Layout, chunk_problem,
                                              write_chunk)
from rcfast.train.teachers import OnlineTeachers, TeacherRequest, load_teacher

__all__ = ["build_teacher_cache", "top_k_rows", "top_k_temperatures", "run_epochs_needed", "CHUNK_BYTES"]

CHUNK_BYTES = 64 << 20
"""About how large one chunk file is (a whole number of batches; at least one)."""
_AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_INT16_MAX_CLASSES = 32768  # indices 0 .. 32767 fit int16


def top_k_temperatures(config: RunConfig) -> list[float]:
    """Per teacher (in config order): the temperature at which the run's terms read its top-k logits.

    What a tail-mass cache is built for. A teacher read at two temperatures, or by no
    term that takes top-k logits, is a :class:`ConfigError`.
    """
    found: dict[str, float] = {}
    for key in config.objective_inputs():
        if not (isinstance(key, TeacherLogits) and key.accepts_top_k and key.temperatures is not None):
            continue
        for teacher, tau in zip(key.teachers, key.temperatures):
            if found.setdefault(teacher, tau) != tau:
                raise ConfigError(f"--tail-mass (the default for a top-k cache): the objective reads teacher "
                                  f"{teacher!r} at temperatures {found[teacher]} and {tau}; a tail is stored for one "
                                  "temperature: use one, or build with --no-tail-mass")
    missing = [tc.name for tc in config.teachers if tc.name not in found]
    if missing:
        raise ConfigError(f"--tail-mass (the default for a top-k cache): no objective term reads the top-k logits "
                          f"of teacher(s) {missing} (only multihead_kd does); build with "
                          "--no-tail-mass")
    return [found[tc.name] for tc in config.teachers]


def run_epochs_needed(max_steps: int, num_images: int, num_shards: int, batch_size: int, drop_last: bool) -> int:
    """How many epochs a run of ``max_steps`` steps with ``num_shards`` ranks reads (its slowest-advancing rank)."""
    epochs = 0
    for shard in range(num_shards):
        images = num_images // num_shards + (0 if drop_last or shard >= num_images % num_shards else 1)
        batches = num_batches(images, batch_size, drop_last)
        if batches == 0:
            raise ConfigError(f"data.batch_size={batch_size} leaves rank {shard} of {num_shards} without a batch")
        epochs = max(epochs, math.ceil(max_steps / batches))
    return epochs


def top_k_rows(packed: torch.Tensor, sizes: list[int], top_k: int, value_dtype: str,
               describe_row=lambda row: f"row {row}", names: list[str] | None = None,
               tail_temperatures: list[float] | None = None):
    """The cache rows of packed ``[n, sum(sizes)]`` teacher logits: ``(values, indices)``, numpy ``[n, W]``.

    A dense cache (``top_k >= max(sizes)``) stores the packed logits themselves
    (``W = sum(sizes)``, ``indices`` is ``None``). A top-k cache stores, per
    teacher, its ``top_k`` largest logits, largest first, and their class
    indices (``W = T * top_k``, teacher after teacher); a teacher with
    ``C <= top_k`` classes is stored whole in class order, padded with ``-inf``
    values (index -1). A dense cache and an ``fp32`` one store the logits as
    computed (rounded to fp16/bf16 if asked: a logit beyond fp16's range is an
    error). A top-k cache in ``fp16``/``bf16`` stores ``logit - max`` of each
    (sample, teacher): its readers use the teacher's softmax only, which
    ignores the shift, and the rounding then falls on the differences the
    distribution depends on. NaN or ``+inf`` logits, or a teacher with only
    ``-inf`` for a sample, are an error naming the teacher (``names``) and ``describe_row(row)``.

    With ``tail_temperatures`` (one temperature per teacher; top-k only), each
    teacher's block has one more entry after its k, its *fill* (index -1): the
    logit to give every class outside the top k so that the softmax at that
    temperature keeps the mass of those classes, spread evenly::

        fill = tau * (logsumexp(z[outside] / tau) - log(C - k))

    Then ``exp(fill/tau) * (C - k) = sum(exp(z[outside]/tau))``, so the
    partition function, the k probabilities and the total tail mass are exact.
    ``W = T * (k + 1)``. A teacher stored whole has ``-inf`` there.
    """
    names = names or [str(t) for t in range(len(sizes))]
    n = packed.shape[0]
    dense = top_k >= max(sizes)
    if tail_temperatures is not None and (dense or len(tail_temperatures) != len(sizes)):
        raise ValueError("tail_temperatures needs a top-k cache and one temperature per teacher")
    blocks = packed.float().split(list(sizes), dim=1)
    for t, block in enumerate(blocks):
        bad = torch.isnan(block).any(dim=1) | torch.isposinf(block).any(dim=1) | torch.isneginf(block).all(dim=1)
        if bool(bad.any()):
            raise ValueError(f"teacher {names[t]!r} gives NaN, +inf or only -inf logits for {describe_row(int(bad.nonzero()[0]))}: "
                             "a cache of them would train on garbage")
    index_dtype = torch.int16 if max(sizes) <= _INT16_MAX_CLASSES else torch.int32
    indices = None
    if dense:
        parts = list(blocks)
    else:
        parts, index_parts = [], []
        for t, (size, block) in enumerate(zip(sizes, blocks)):
            if size <= top_k:
                pad = top_k - size
                values = torch.nn.functional.pad(block, (0, pad), value=float("-inf"))
                index = torch.cat([torch.arange(size, dtype=index_dtype).expand(n, size),
                                   torch.full((n, pad), -1, dtype=index_dtype)], dim=1)
                fill = torch.full((n, 1), float("-inf"), dtype=block.dtype, device=block.device)
            else:
                values, top_indices = block.topk(top_k, dim=1)
                index = top_indices.cpu().to(index_dtype)
                fill = None if tail_temperatures is None else _tail_fill(block, top_indices, tail_temperatures[t])
            if tail_temperatures is not None:
                values = torch.cat([values, fill], dim=1)
                index = torch.nn.functional.pad(index, (0, 1), value=-1)
            parts.append(values)
            index_parts.append(index)
        indices = torch.cat(index_parts, dim=1).numpy()
    if value_dtype != "fp32":
        # The fill is never above the k entries, so the shift is the top entry's either way.
        exact = parts if dense else [part - part.amax(dim=1, keepdim=True) for part in parts]
        stored = [part.to(VALUE_DTYPES[value_dtype][1]) for part in exact]
        stored_check, exact_check = stored, exact
        if tail_temperatures is not None:
            # A fill below the dtype's range rounds to -inf, which is what it weighs: exp(-65504 / tau) = 0
            # at any allowed tau. Only the k entries must fit.
            stored_check, exact_check = [p[:, :-1] for p in stored], [p[:, :-1] for p in exact]
        for t, (before, rounded) in enumerate(zip(exact_check, stored_check)):
            overflow = torch.isinf(rounded) & ~torch.isinf(before)
            if bool(overflow.any()):
                row = int(overflow.any(dim=1).nonzero()[0])
                largest = float(before[row][~torch.isinf(before[row])].abs().max())
                raise ValueError(f"teacher {names[t]!r}'s logits for {describe_row(row)} do not fit {value_dtype} "
                                 f"({'a logit' if dense else 'a difference to the largest'} of magnitude "
                                 f"{largest:.4g}): rebuild with --dtype bf16 or fp32")
        parts = stored
    values = torch.cat(parts, dim=1).cpu()
    if value_dtype == "bf16":
        values_np = values.view(torch.int16).numpy().view(VALUE_DTYPES["bf16"][0])
    else:
        values_np = values.numpy().astype(VALUE_DTYPES[value_dtype][0], copy=False)
    if indices is not None:
        indices = indices.astype(INDEX_DTYPES["int16" if index_dtype == torch.int16 else "int32"], copy=False)
    return values_np, indices


def _tail_fill(block: torch.Tensor, top_indices: torch.Tensor, tau: float) -> torch.Tensor:
    """``[n, 1]``: the logit that, given to each class outside ``top_indices``, keeps their total mass at ``tau``.

    ``tau * (logsumexp(z[outside] / tau) - log(C - k))``, in float64.
    """
    size, top_k = block.shape[1], top_indices.shape[1]
    z = (block.double() / tau).scatter(1, top_indices, float("-inf"))
    tail = torch.logsumexp(z, dim=1, keepdim=True)
    return (tau * (tail - math.log(size - top_k))).to(block.dtype)


@contextlib.contextmanager
def _shard_lock(root: Path, shard: int):
    """Exclusive hold on building one shard of a cache (a second build of the same shard fails at once)."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".build-shard-{shard:04d}.lock", "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(f"another cache-teachers process is building shard {shard} of {root}") from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_stale_temp_files(root: Path, shard: int) -> None:
    # Left by a build killed mid-write: never renamed, never counted.
    for tmp in root.glob(f"epoch_*/.shard_{shard:04d}_chunk_*.tmp-*"):
        tmp.unlink(missing_ok=True)


def _settle_manifest(root: Path, pins: dict, epochs: int, storage: dict, layout: Layout, log) -> int:
    """Write a new manifest, or check an existing one against this build; return the epochs it covers."""
    if not (root / "manifest.json").exists():
        write_manifest(root, pins, epochs, storage, layout,
                       extra={"created_with": {"rcfast": _version(), "torch": torch.__version__}})
        return epochs
    manifest = read_manifest(root)
    check_pins(root, manifest["pins"], pins)
    for key, value in storage.items():
        if manifest["storage"][key] != value:
            raise CacheError(f"--out {root} holds a cache with {key}={manifest['storage'][key]!r}, this build asks "
                             f"for {value!r}: choose another --out (or delete it)")
    if manifest["layout"] != layout:
        old, new = manifest["layout"].to_dict(), layout.to_dict()
        key = next(k for k in old if old[k] != new[k])
        raise CacheError(f"--out {root} holds a cache built with {key}={old[key]!r}, this build has {new[key]!r}: "
                         "choose another --out (or delete it)")
    if epochs > manifest["epochs"]:
        log(f"[cache-teachers] extending {root} from {manifest['epochs']} to {epochs} epochs")
        write_manifest(root, pins, epochs, storage, layout,
                       extra={k: v for k, v in manifest.items()
                              if k not in ("format", "epochs", "pins", "storage", "layout")})
        return epochs
    return manifest["epochs"]


def _version() -> str:
    import rcfast
    return rcfast.__version__


def build_teacher_cache(config: RunConfig, out: str | Path, *, epochs: int | None = None, top_k: int | None = None,
                        dtype: str | None = None, num_shards: int | None = None, chunk_batches: int | None = None,
                        tail_mass: bool | None = None, progress: bool = True, log=print) -> dict:
    """Build (or finish, or extend) the teacher cache of ``config`` in ``out``; return a summary.

    Args:
        config: the run's config (its teachers, ``data``, ``train.seed``/``precision``/``device``).
        out: the cache folder (created; an existing cache of this run is resumed).
        epochs: epochs to cover (default: what ``train.max_steps`` needs with ``num_shards`` ranks).
        top_k: logits kept per (sample, teacher) (default: all classes -- a dense cache).
        dtype: ``"fp32"``, ``"fp16"`` or ``"bf16"`` storage of the values (default ``fp32`` for a
            dense cache, which then reproduces the online run bitwise, ``fp16`` for top-k).
        num_shards: the rank count of the runs that will read it bitwise (default: the
            ``torchrun`` world size, else 1); any rank count can read it.
        chunk_batches: batches per chunk file (default: about :data:`CHUNK_BYTES` per file).
        tail_mass: (top-k; default ``True`` for a top-k cache) also store, per
            (sample, teacher), the logit that keeps the mass of the classes
            outside the top k at the temperature the run's ``multihead_kd``
            term reads that teacher (:func:`top_k_rows`): the run's target is
            then the teacher's exact top-k probabilities plus its tail spread
            evenly. One more value per teacher; such a cache serves only that
            temperature. ``False``: the k entries alone, renormalised by the
            loss (any temperature; loses accuracy where the top k hold little
            of the softened target -- docs/teacher_cache.md#accuracy).

    Returns ``{out, epochs, images_per_epoch, top_k, value_dtype, index_dtype,
    tail_temperatures, bytes_per_image, bytes, chunks_built, chunks_reused, build_seconds}``.
    """
    from rcfast.data import ProxyImages

    started = time.perf_counter()
    config.validate()
    if not config.teachers:
        raise ConfigError("cache-teachers: the config has no teachers to cache")
    if not config.data.source:
        raise ConfigError("cache-teachers: the config has no data.source (the proxy images the teachers see)")
    t, d = config.train, config.data
    ctx = setup_distributed(t.device, t.dist_backend)
    if num_shards is None:
        num_shards = ctx.world_size
    if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards <= 0:
        raise ValueError(f"num_shards must be a positive integer, got {num_shards!r}")
    sizes = [tc.num_classes for tc in config.teachers]
    if top_k is None or top_k >= max(sizes):
        if top_k is not None and top_k > max(sizes):
            log(f"[cache-teachers] --top-k {top_k} >= every teacher's classes (max {max(sizes)}): storing all "
                "classes (a dense cache)")
        top_k = max(sizes)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0:
        raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
    dense = top_k >= max(sizes)
    dtype = dtype or ("fp32" if dense else "fp16")
    if dtype not in VALUE_DTYPES:
        raise ValueError(f"dtype must be one of {list(VALUE_DTYPES)}, got {dtype!r}")
    if epochs is not None and (isinstance(epochs, bool) or not isinstance(epochs, int) or epochs <= 0):
        raise ValueError(f"epochs must be a positive integer, got {epochs!r}")
    if tail_mass is not None and not isinstance(tail_mass, bool):
        raise TypeError(f"tail_mass must be True, False or None (the default), got {tail_mass!r}")
    if tail_mass and dense:
        log("[cache-teachers] a dense cache keeps every class: --tail-mass has nothing to add")
    # None (the default): a top-k cache keeps its tail; a dense one has none to keep.
    tail_temperatures = top_k_temperatures(config) if not dense and tail_mass is not False else None
    root = Path(out)

    def dataset(shard: int) -> ProxyImages:
        return ProxyImages(d.source, image_size=d.image_size, batch_size=d.batch_size, device=str(ctx.device),
                           shard_id=shard, num_shards=num_shards, seed=t.seed, augment=d.augment, labels=d.labels,
                           drop_last=False, backend=d.backend, num_threads=d.num_threads, shuffle=d.shuffle)

    my_shards = [s for s in range(num_shards) if s % ctx.world_size == ctx.rank]
    first = dataset(my_shards[0] if my_shards else 0)
    if epochs is None:
        epochs = run_epochs_needed(t.max_steps, first.total_images, num_shards, d.batch_size, d.drop_last)
    pins = run_pins(config, first)
    teachers = {tc.name: load_teacher(tc, ctx.device) for tc in config.teachers}
    amp_dtype = _AMP_DTYPES[t.precision]

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=ctx.device.type, dtype=amp_dtype)

    online = OnlineTeachers(teachers, num_classes={tc.name: tc.num_classes for tc in config.teachers},
                            autocast=autocast)
    names = tuple(teachers)
    probe = online(TeacherRequest("proxy", 0, torch.zeros(1, 3, d.image_size, d.image_size, device=ctx.device),
                                  names))
    storage = {"top_k": top_k, "value_dtype": dtype,
               "values_are": "logits" if dense or dtype == "fp32" else "logits minus the sample's max",
               "index_dtype": None if dense else ("int16" if max(sizes) <= _INT16_MAX_CLASSES else "int32"),
               "logits_dtype": str(probe.logits.dtype).replace("torch.", ""),
               "tail_temperatures": tail_temperatures}
    width = row_width(sizes, top_k, tail_temperatures is not None)
    row_bytes = width * (np.dtype(VALUE_DTYPES[dtype][0]).itemsize
                             + (np.dtype(INDEX_DTYPES[storage["index_dtype"]]).itemsize if not dense else 0))
    if chunk_batches is None:
        chunk_batches = max(1, CHUNK_BYTES // (row_bytes * d.batch_size))
    layout = Layout(num_images=first.total_images, num_shards=num_shards, batch_size=d.batch_size,
                    chunk_batches=chunk_batches, row_width=width, value_dtype=dtype,
                    index_dtype=storage["index_dtype"], seed=t.seed, shuffle=first.shuffle)
    if ctx.is_main:
        epochs = _settle_manifest(root, pins, epochs, storage, layout, log)
    ctx.barrier()
    epochs = read_manifest(root)["epochs"]

    built = reused = 0
    total_batches = sum(math.ceil(layout.shard_rows(s) / d.batch_size) for s in my_shards) * epochs
    bar = tqdm(total=total_batches, unit="batch", desc="cache-teachers", dynamic_ncols=True,
               disable=not (progress and ctx.is_main))
    datasets = {first.shard_id: first}
    try:
        with contextlib.ExitStack() as locks:
            for shard in my_shards:
                locks.enter_context(_shard_lock(root, shard))
                _remove_stale_temp_files(root, shard)
                if shard not in datasets:
                    datasets[shard] = dataset(shard)
            for epoch in range(epochs):
                for shard in my_shards:
                    b, r = _build_shard_epoch(root, layout, epoch, shard, datasets[shard], online, names, sizes,
                                              top_k, tail_temperatures, bar)
                    built, reused = built + b, reused + r
    finally:
        bar.close()
        for ds in datasets.values():
            ds.close()
    ctx.barrier()
    seconds = time.perf_counter() - started
    summary = {"out": str(root), "epochs": epochs, "images_per_epoch": layout.num_images, "top_k": top_k,
               "value_dtype": dtype, "index_dtype": storage["index_dtype"], "tail_temperatures": tail_temperatures,
               "bytes_per_image": layout.row_bytes,
               "bytes": layout.row_bytes * layout.num_images * epochs, "chunks_built": built,
               "chunks_reused": reused, "build_seconds": seconds}
    ctx.shutdown()
    return summary


def _build_shard_epoch(root: Path, layout: Layout, epoch: int, shard: int, data, online: OnlineTeachers,
                       names: tuple[str, ...], sizes: list[int], top_k: int, tail_temperatures: list[float] | None,
                       bar) -> tuple[int, int]:
    """Build the missing chunks of one (epoch, shard); return ``(chunks built, chunks already there)``."""
    todo = [c for c in range(layout.num_chunks(shard))
            if chunk_problem(root, layout, epoch, shard, c, verify=True) is not None]
    reused = layout.num_chunks(shard) - len(todo)
    batches_per_epoch = math.ceil(layout.shard_rows(shard) / layout.batch_size)
    bar.update(sum(min(layout.chunk_batches, batches_per_epoch - c * layout.chunk_batches)
                   for c in range(layout.num_chunks(shard)) if c not in todo))
    position = None  # the batch the running iterator yields next
    iterator = None
    for chunk in todo:
        first_batch = chunk * layout.chunk_batches
        if position != first_batch:
            data.load_state_dict({"epoch": epoch, "batches_consumed": first_batch})
            iterator, position = iter(data), first_batch
        rows = layout.chunk_rows(shard, chunk)
        values = np.empty((rows, layout.row_width), dtype=VALUE_DTYPES[layout.value_dtype][0])
        indices = (None if layout.index_dtype is None else
                   np.empty(values.shape, dtype=INDEX_DTYPES[layout.index_dtype]))
        filled = 0
        while filled < rows:
            batch = next(iterator)
            images = batch[0] if isinstance(batch, (tuple, list)) else batch
            samples = data.epoch_indices(epoch)[position * layout.batch_size:][:images.shape[0]]
            packed = online(TeacherRequest("proxy", position, images, names)).logits

            def describe(row: int, samples=samples) -> str:
                return f"image {data.paths[int(samples[row])]} (epoch {epoch}, sample {int(samples[row])})"

            batch_values, batch_indices = top_k_rows(packed, sizes, top_k, layout.value_dtype, describe, list(names),
                                                     tail_temperatures)
            values[filled:filled + len(samples)] = batch_values
            if indices is not None:
                indices[filled:filled + len(samples)] = batch_indices
            filled += len(samples)
            position += 1
            bar.update(1)
        write_chunk(root, layout, epoch, shard, chunk, values, indices)
    return len(todo), reused
