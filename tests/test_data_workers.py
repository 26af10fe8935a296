"""rcfast.data processes and threads: PIL workers start wherever DataLoader's do, never outlive their
parent, never finalise an inherited DALI pipeline; both backends leave the caller's process as they found it.

Everything that depends on how a process starts or dies runs in a fresh
subprocess (a script file, or a script on standard input).
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.images import smooth_rgb

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("workers")
    for i in range(12):
        Image.fromarray(smooth_rgb(40 + i, 30, seed=i)).save(root / f"img{i:02d}.jpg", quality=90)
    return root


def _env(tmp_path) -> dict:
    env = dict(os.environ, RCFAST_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    return env


# A plain script, no `if __name__ == "__main__":` guard: what a new user writes.
UNGUARDED = """
import sys
from rcfast.data import ProxyImages
ds = ProxyImages(sys.argv[1] if len(sys.argv) > 1 else {folder!r}, image_size=16, batch_size=4,
                 backend="pil", num_threads=2)
n = sum(len(b) for _ in range(2) for b in ds)
print("images", n)
"""


@pytest.mark.slow  # a fresh Python subprocess
def test_pil_workers_run_in_a_script_without_main_guard(tmp_path, image_folder):
    """Regression: 'DataLoader worker exited unexpectedly' (the fork server re-ran the script)."""
    script = tmp_path / "train.py"
    script.write_text(UNGUARDED.format(folder=str(image_folder)))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180,
                            env=_env(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["images", "24"]


@pytest.mark.slow  # a fresh Python subprocess
def test_pil_workers_run_from_a_script_on_standard_input(tmp_path, image_folder):
    """Regression: `python - < script.py` crashed even with the guard (no file to re-import)."""
    source = UNGUARDED.format(folder=str(image_folder))
    guarded = "if __name__ == '__main__':\n" + textwrap.indent(source, "    ")
    for text in (source, guarded):
        result = subprocess.run([sys.executable, "-"], input=text, capture_output=True, text=True,
                                timeout=180, env=_env(tmp_path), cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.split()[-2:] == ["images", "24"]


def _read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The child's next stdout line, or '' when it prints none within `timeout`."""
    import selectors
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            return ""
    return proc.stdout.readline()


def _alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie (an orphan nobody reaped is dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


FOREVER = """
import os, sys, threading
from rcfast.data import ProxyImages
ds = ProxyImages(sys.argv[1], image_size=16, batch_size=4, backend="pil", num_threads=2)

def run():
    batches = iter(ds)
    next(batches)
    workers = [w.pid for w in ds._runner._loader._iterator._workers]
    print("pids", os.getpid(), *workers, flush=True)
    while True:
        for _ in ds:
            pass

if sys.argv[2] == "main":
    run()
else:
    threading.Thread(target=run, daemon=True).start()
    threading.Event().wait()
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and PR_SET_PDEATHSIG are Linux's")
@pytest.mark.parametrize("sig, thread, within", [
    (signal.SIGKILL, "main", 5.0), (signal.SIGTERM, "main", 5.0),
    # Started from another thread, the death signal would follow that thread,
    # so it is not requested; DataLoader's watchdog (5 s) ends the workers.
    (signal.SIGKILL, "other", 20.0),
], ids=["SIGKILL", "SIGTERM", "SIGKILL-iterating-in-a-thread"])
def test_no_worker_survives_its_parent(tmp_path, image_folder, sig, thread, within):
    """Regression: after SIGKILL/SIGTERM the fork server and its workers (~570 MB) stayed forever."""
    script = tmp_path / "forever.py"
    script.write_text(FOREVER)
    proc = subprocess.Popen([sys.executable, str(script), str(image_folder), thread], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(tmp_path), cwd=tmp_path)
    try:
        line = _read_line(proc, timeout=120)
        assert line.startswith("pids"), proc.stderr.read() if proc.poll() is not None else "no worker started"
        parent, *workers = (int(v) for v in line.split()[1:])
        assert parent == proc.pid and len(workers) == 2 and all(_alive(w) for w in workers)
        proc.send_signal(sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + within
        while any(_alive(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        survivors = [w for w in workers if _alive(w)]
        for w in survivors:  # do not leak them into the machine if the test fails
            os.kill(w, signal.SIGKILL)
        assert survivors == [], f"workers {survivors} outlived their parent by {within} s"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


INHERITED_GARBAGE = """
import gc, sys
import numpy as np
import nvidia.dali.fn as fn, nvidia.dali.types as types
from nvidia.dali import pipeline_def
from rcfast.data import ProxyImages, pil_pipeline

@pipeline_def(batch_size=2, num_threads=2, device_id=None)
def decode_pipe():
    data = fn.external_source(source=lambda: [np.zeros(8, np.uint8)] * 2, batch=True)
    return fn.cast(data, dtype=types.FLOAT)

gc.disable()  # so the cycle below is still uncollected garbage when the workers fork
pipe = decode_pipe()
pipe.build()
pipe.run()
pipe.cycle = pipe  # unreachable after `del`, freed only by a garbage collection
del pipe

real_load = pil_pipeline.load_window
def collect_then_load(*args):
    gc.collect()  # a worker's collection would finalise the inherited pipeline: DALI's destructor
    return real_load(*args)  # waits for executor threads that do not exist in the child
pil_pipeline.load_window = collect_then_load

ds = ProxyImages(sys.argv[1], image_size=16, batch_size=4, backend="pil", num_threads=1)
print("images", sum(len(b) for b in ds), flush=True)
"""


@pytest.mark.slow
def test_forked_workers_never_finalise_an_inherited_dali_pipeline(tmp_path, image_folder):
    """Regression for the deadlock that made the PIL backend use a fork server: a worker forked while a
    DALI pipeline was uncollected garbage destroyed it in its own garbage collection and hung."""
    pytest.importorskip("nvidia.dali")
    script = tmp_path / "garbage.py"
    script.write_text(INHERITED_GARBAGE)
    try:
        result = subprocess.run([sys.executable, str(script), str(image_folder)], capture_output=True,
                                text=True, timeout=120, env=_env(tmp_path), cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("the PIL worker hung finalising an inherited DALI pipeline")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[-2:] == ["images", "12"]


# The caller's process before and after constructing, iterating and closing a
# dataset: everything a library could change behind its back.
PROCESS_STATE = """
import gc, json, multiprocessing, multiprocessing.forkserver as forkserver, os, random, sys, threading, time
import warnings
import numpy as np, torch
from rcfast.data import ProxyImages

def children():
    me = str(os.getpid())
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me and fields[0] not in ("Z", "X"):
                out.append(int(entry))
    return sorted(out)

def state():
    return {
        "start_method": multiprocessing.get_start_method(allow_none=True),
        "forkserver_preload": repr(getattr(forkserver._forkserver, "_preload_modules", None)),
        "python_threads": sorted(t.name for t in threading.enumerate()),
        "os_threads": len(os.listdir("/proc/self/task")),
        "children": children(),
        "torch_threads": torch.get_num_threads(),
        "torch_rng": torch.get_rng_state().tolist(),
        "numpy_rng": repr(np.random.get_state()),
        "python_rng": repr(random.getstate()),
        "environ": dict(os.environ),
        "warning_filters": repr(warnings.filters),
        "gc": [gc.isenabled(), gc.get_freeze_count(), gc.get_threshold()],
    }

def use(kwargs):
    ds = ProxyImages(sys.argv[1], image_size=32, batch_size=4, device="cpu", **kwargs)
    for batch in ds:  # a whole epoch
        pass
    for k, batch in enumerate(ds):  # and part of the next
        if k == 1:
            break
    ds.close()
    return ds

torch.set_num_threads(2)
kwargs = json.loads(sys.argv[2])
use(kwargs)  # once first: libraries load, global pools (DALI's, OpenMP's) start
gc.collect()
before = state()
ds = use(kwargs)
after_close = state()
# Every thread close() stopped is joined, so Python's view is exact at once; the
# kernel removes a joined thread's task a moment after join() returns (CPython
# releases the join lock just before the thread's last instructions), so only
# the OS count gets a short while to settle.
deadline = time.monotonic() + 2
while after_close["os_threads"] != before["os_threads"] and time.monotonic() < deadline:
    time.sleep(0.01)
    after_close["os_threads"] = len(os.listdir("/proc/self/task"))
del ds  # freed by reference counting: its finalizer asks the threads to stop, without waiting
deadline = time.monotonic() + 10
while (after := state()) != before and time.monotonic() < deadline:
    time.sleep(0.05)
print(json.dumps({"diff": {k: [before[k], after[k]] for k in before if before[k] != after[k]},
                  "diff_at_close": {k: [before[k], after_close[k]] for k in before
                                    if before[k] != after_close[k]}}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("kwargs", [
    dict(backend="pil", num_threads=2), dict(backend="pil", num_threads=0),
    dict(backend="dali", num_threads=2, augment="rrc_flip"),  # DALI decode + torch finishing threads
    dict(backend="dali", num_threads=2, augment="center"),    # the all-DALI graph
], ids=["pil-workers", "pil-inline", "dali-torch-finish", "dali-graph"])
def test_the_callers_process_is_left_as_it_was_found(tmp_path, image_folder, kwargs):
    if kwargs["backend"] == "dali":
        pytest.importorskip("nvidia.dali")
    script = tmp_path / "state.py"
    script.write_text(PROCESS_STATE)
    result = subprocess.run([sys.executable, str(script), str(image_folder), json.dumps(kwargs)],
                            capture_output=True, text=True, timeout=300, env=_env(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["diff_at_close"] == {}, report["diff_at_close"]  # close() releases everything
    assert report["diff"] == {}, report["diff"]


def test_pil_close_returns_after_its_queue_feeder_threads_end(image_folder):
    """Regression (CI: one more OS thread after close): DataLoader's shutdown closes its index queues
    but cancels the join of their feeder threads, which then ended a moment after close() returned."""
    import threading

    from rcfast.data import ProxyImages

    ds = ProxyImages(image_folder, image_size=16, batch_size=4, backend="pil", num_threads=2)
    assert sum(len(b) for b in ds) == 12
    iterator = ds._runner._loader._iterator
    feeders = [q._thread for q in iterator._index_queues if q._thread is not None]
    assert len(feeders) == 2 and all(t.is_alive() for t in feeders)
    ds.close()
    assert [t.name for t in feeders if t.is_alive()] == []
    assert [t.name for t in threading.enumerate() if t in feeders] == []
    assert all(not w.is_alive() for w in iterator._workers)


def test_dali_finishing_threads_limit_only_their_own_openmp_team(image_folder):
    pytest.importorskip("nvidia.dali")
    import torch
    from threadpoolctl import threadpool_info

    from rcfast.data import ProxyImages

    def openmp_threads():
        return [lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "openmp"]

    main_before = openmp_threads()
    with ProxyImages(image_folder, image_size=32, batch_size=4, backend="dali", device="cpu",
                     num_threads=2) as ds:
        next(iter(ds))
        pool = ds._runner._engine.finish.pool
        in_pool = {pool.submit(openmp_threads).result()[0] for _ in range(8)}
        assert in_pool == {1}
        assert openmp_threads() == main_before and main_before[0] == torch.get_num_threads()


def test_the_pil_worker_start_method_is_private(image_folder):
    """The DataLoader gets its own fork context; the process-wide start method stays unset."""
    import multiprocessing

    from rcfast.data import ProxyImages
    from rcfast.data.pil_pipeline import _worker_context

    method = multiprocessing.get_start_method(allow_none=True)
    with ProxyImages(image_folder, image_size=16, batch_size=4, backend="pil", num_threads=1) as ds:
        assert sum(len(b) for b in ds) == 12
        assert ds._runner._loader.multiprocessing_context is _worker_context()
    assert multiprocessing.get_start_method(allow_none=True) == method
    if sys.platform.startswith("linux"):
        assert _worker_context().get_start_method() == "fork"


@pytest.mark.parametrize("kwargs", [
    dict(backend="pil", num_threads=2), dict(backend="pil", num_threads=0),
    dict(backend="dali", augment="rrc_flip"), dict(backend="dali", augment="center"),
], ids=["pil-workers", "pil-inline", "dali-torch-finish", "dali-graph"])
def test_a_dropped_dataset_is_freed_by_reference_counting(image_folder, kwargs):
    """No reference cycle: a dataset (and its backend) dropped mid-epoch is freed at once, in the thread
    that drops it, never later inside a garbage collection in some other thread. (A finalizer that stopped
    threads from inside a collection deadlocked the suite: it held a lock the stopping thread needed.)"""
    if kwargs["backend"] == "dali":
        pytest.importorskip("nvidia.dali")
    import gc
    import weakref

    from rcfast.data import ProxyImages

    enabled = gc.isenabled()
    gc.disable()
    try:
        ds = ProxyImages(image_folder, image_size=16, batch_size=4, device="cpu", **kwargs)
        batches = iter(ds)
        next(batches)  # abandoned mid-epoch, work in flight
        refs = [weakref.ref(ds), weakref.ref(ds._runner)]
        del ds, batches
        assert [r() for r in refs] == [None, None]
    finally:
        if enabled:
            gc.enable()
