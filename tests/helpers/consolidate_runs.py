"""Tiny ``rcfast consolidate`` runs for the IE-KD / mutual-learning / DMC tests: images, configs, resume checks."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from rcfast import cli


@pytest.fixture
def restore_global_rng():
    """`rcfast consolidate` seeds the global RNGs (it owns its process); give the test's back afterwards."""
    state = (torch.get_rng_state(), np.random.get_state(), random.getstate())
    yield
    torch.set_rng_state(state[0])
    np.random.set_state(state[1])
    random.setstate(state[2])


def write_class_images(root: Path, classes: int, per_class: int = 8, seed: int = 0, size: int = 16) -> Path:
    """``root/<class>/<i>.png``: ``size``-pixel PNGs whose colour channel and band depend on the class."""
    rng = np.random.default_rng(seed)
    band = max(1, size // classes)
    for c in range(classes):
        folder = root / str(c)
        folder.mkdir(parents=True)
        base = np.zeros((size, size, 3))
        base[..., c % 3] = 200
        base[c * band:(c + 1) * band] += 55
        for i in range(per_class):
            pixels = np.clip(base + rng.normal(0, 30, size=base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return root


def consolidate(config: dict, path: Path) -> int:
    """Write ``config`` as YAML to ``path`` and run ``rcfast consolidate`` on it (in this process)."""
    path.write_text(yaml.safe_dump(config))
    return cli.main(["consolidate", "--config", str(path)])


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def checkpoint(out: Path, step: int) -> dict:
    return torch.load(out / "checkpoints" / f"checkpoint_{step:09d}.pt", weights_only=True, map_location="cpu")


def assert_resumes_exactly(config: dict, out: Path, config_path: Path, from_step: int = 2) -> None:
    """Continue ``config``'s finished run from its ``from_step`` checkpoint; it must end bitwise where it ended."""
    steps = config["train"]["max_steps"]
    uninterrupted = checkpoint(out, steps)
    for path in (out / "checkpoints").glob("checkpoint_*.pt"):
        if int(path.stem.split("_")[1]) > from_step:
            path.unlink()
    assert consolidate(config, config_path) == 0
    resumed = checkpoint(out, steps)
    for key in ("model", "objective"):
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=0, atol=0, msg=lambda m: f"{key}: {m}")
    torch.testing.assert_close(resumed["optimizer"]["state"], uninterrupted["optimizer"]["state"], rtol=0, atol=0)
    assert resumed["optimizer"]["param_groups"] == uninterrupted["optimizer"]["param_groups"]
    assert resumed["scheduler"] == uninterrupted["scheduler"]
    assert resumed["step"] == uninterrupted["step"] == steps
