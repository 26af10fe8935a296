"""Transfer evaluation: separable toy problems score high, random labels score near chance; ``rcfast eval``
treats the config stored in a checkpoint as untrusted data."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from helpers import TensorProxy, toy_images
from helpers.fake_libs import FakeTimmNet, fake_timm
from helpers.tiny_run import one_line_error, proxy_folder
from rcfast import cli
from rcfast.eval import evaluate_transfer, extract_features, finetune_accuracy, knn_accuracy, linear_probe
from rcfast.models import build_model
from rcfast.train.checkpoint import save_checkpoint_file
from rcfast.train.trained_model import load_trained_backbone


def _blobs(n: int, classes: int, dim: int, seed: int, separation: float = 4.0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * separation
    labels = rng.integers(0, classes, size=n)
    return (centres[labels] + rng.normal(size=(n, dim))).astype(np.float32), labels


def test_linear_probe_and_knn_on_a_separable_problem():
    x, y = _blobs(600, 5, 32, seed=0)
    probe = linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert probe["accuracy"] >= 0.97
    assert probe["best_C"] in (0.01, 0.1, 1.0, 10.0) and len(probe["C_sweep"]) == 4
    knn = knn_accuracy(x[:400], y[:400], x[400:], y[400:], k=[1, 10])
    assert set(knn) == {1, 10} and min(knn.values()) >= 0.97


def test_random_labels_give_chance_accuracy():
    x, _ = _blobs(1200, 5, 32, seed=1)
    y = np.random.default_rng(2).integers(0, 4, size=1200)  # labels independent of the features
    probe = linear_probe(x[:800], y[:800], x[800:], y[800:])
    knn = knn_accuracy(x[:800], y[:800], x[800:], y[800:], k=10)
    # chance is 0.25; 400 test samples put its 3-sigma band at about +-0.065
    assert 0.15 <= probe["accuracy"] <= 0.35
    assert 0.15 <= knn[10] <= 0.35


def test_probe_and_knn_reject_bad_input():
    x, y = _blobs(50, 3, 4, seed=3)
    with pytest.raises(ValueError, match="features must be"):
        linear_probe(x, y[:10], x, y)
    with pytest.raises(ValueError, match="Cs"):
        linear_probe(x, y, x, y, Cs=[0.0])
    with pytest.raises(ValueError, match="k=100 exceeds"):
        knn_accuracy(x, y, x, y, k=100)


def test_extract_features_restores_mode_and_orders_labels():
    images, labels = toy_images(20, 4, image_size=8, seed=0)
    backbone = build_model("small_cnn", width=4)
    backbone.train()
    data = TensorProxy(images, labels, batch_size=6, labels=True, drop_last=False)
    feats, got = extract_features(backbone, data)
    assert feats.shape == (20, 16) and feats.dtype == np.float32 and got.shape == (20,)
    assert backbone.training
    assert sorted(got.tolist()) == sorted(labels.tolist())
    with pytest.raises(ValueError, match=r"\(images, labels\)"):
        extract_features(backbone, [images[:4]])


@pytest.mark.slow
def test_evaluate_transfer_with_finetune_learns_a_separable_image_task():
    torch.manual_seed(0)
    x, y = toy_images(160, 4, image_size=8, seed=5)
    train = TensorProxy(x[:120], y[:120], batch_size=20, labels=True, drop_last=False)
    test = TensorProxy(x[120:], y[120:], batch_size=40, labels=True, drop_last=False)
    backbone = build_model("small_cnn", width=8)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    result = evaluate_transfer(backbone, train, test, knn_k=[5], finetune_epochs=4, finetune_lr=3e-3)
    assert set(result) == {"linear_probe", "linear_probe_C", "knn@5", "finetune"}
    # class prototypes + noise: even random conv features separate them
    assert result["linear_probe"] >= 0.9 and result["knn@5"] >= 0.8
    assert result["finetune"] >= 0.8
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())  # the caller's copy is untouched


def test_finetune_rejects_zero_epochs():
    x, y = toy_images(8, 2, image_size=8)
    data = TensorProxy(x, y, batch_size=4, labels=True)
    with pytest.raises(ValueError, match="epochs"):
        finetune_accuracy(build_model("small_cnn", width=4), data, data, 2, epochs=0)


# ---------------------------------------------------------------------------------------------------------------
# `rcfast eval` reads a config from the checkpoint: untrusted data, never a way to run code (issue 8, item 18).
# timm 1.0.9-1.0.24 call torch.load(weights_only=False) on `checkpoint_path` / `pretrained_cfg_overlay.file`:
# a file of the attacker's choosing, i.e. arbitrary code. The fake timm records what it would have been given.


def _final_with_config(path, backbone: str, kwargs: dict, weights: dict, image_size=16):
    return save_checkpoint_file({
        "format": "rcfast.model/1", "model": {f"backbone.{k}": v for k, v in weights.items()},
        "config": {"student": {"backbone": backbone, "backbone_kwargs": kwargs}, "data": {"image_size": image_size}},
    }, path)


def _task(root):
    for split in ("train", "test"):
        for c in range(2):
            proxy_folder(root / split / f"c{c}", count=4, seed=c)
    return root


@pytest.mark.parametrize("kwargs,refused", [
    ({"checkpoint_path": "/tmp/evil.pt"}, "checkpoint_path"),
    ({"pretrained_cfg_overlay": {"file": "/tmp/evil.pt"}}, "pretrained_cfg_overlay"),
    ({"pretrained": True}, "pretrained"),
    ({"pretrained_cfg": {"url": "https://example.com/evil.pt"}}, "pretrained_cfg"),
    ({"drop_rate": "/tmp/evil.pt"}, "drop_rate='/tmp/evil.pt', not a plain number"),
    ({"drop_rate": True}, "drop_rate=True, not a plain number"),
], ids=["checkpoint_path", "overlay-file", "pretrained", "pretrained_cfg-url", "path-in-allowed-key", "bool"])
def test_eval_never_passes_paths_or_pretrained_switches_from_a_checkpoint(tmp_path, capsys, monkeypatch, kwargs,
                                                                          refused):
    calls = []
    fake_timm(monkeypatch, calls)
    final = _final_with_config(tmp_path / "final.pt", "timm:net_fake", kwargs, FakeTimmNet(0).state_dict())
    assert cli.main(["eval", "--checkpoint", str(final), "--data", str(_task(tmp_path / "task"))]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert refused in error and "untrusted" in error and "--backbone NAME --backbone-kwargs JSON" in error, error
    assert calls == []  # the builder never ran


def test_eval_passes_plain_architecture_numbers_and_the_user_s_own_kwargs(tmp_path, monkeypatch):
    calls = []
    fake_timm(monkeypatch, calls)
    final = _final_with_config(tmp_path / "final.pt", "timm:net_fake", {"drop_rate": 0.1},
                               FakeTimmNet(0).state_dict(), image_size=24)
    trained = load_trained_backbone(final)
    assert trained.from_stored_config and trained.image_size == 24 and trained.name == "timm:net_fake"
    assert calls == [("net_fake", {"drop_rate": 0.1, "num_classes": 0})] * 2  # meta-device check, then the model
    calls.clear()
    # what the user passes themselves is theirs to decide (and the stored image size can be overridden)
    trained = load_trained_backbone(final, "timm:net_fake", {"drop_rate": 0.2, "checkpoint_path": "mine.pt"}, 32)
    assert calls[-1] == ("net_fake", {"drop_rate": 0.2, "checkpoint_path": "mine.pt", "num_classes": 0})
    assert trained.image_size == 32 and not trained.from_stored_config


@pytest.mark.parametrize("config,message", [
    ({"student": {"backbone": "small_cnn", "backbone_kwargs": {"width": 10**7}}},
     r"does not fit backbone 'small_cnn' with \{'width': 10000000\}"),   # a 10^15-parameter model: never allocated
    ({"student": {"backbone": "small_cnn", "backbone_kwargs": {"norm": "../../etc/passwd"}}}, "not a plain number"),
    ({"student": {"backbone": "small_cnn", "backbone_kwargs": {"evil": 1}}}, "the keyword 'evil'"),
    ({"student": {"backbone": "os.system", "backbone_kwargs": {}}}, "an unknown model 'os.system'"),
    ({"student": {"backbone": ["small_cnn"]}}, "not a non-empty string"),
    ({"student": "small_cnn"}, "not a non-empty string"),
    ({"student": {"backbone": "small_cnn", "backbone_kwargs": {"width": 4}}, "data": {"image_size": 10**9}},
     r"data.image_size=1000000000, not an integer in \[1, 4096\]"),
    (["not", "a", "mapping"], "its stored config is a list, not a mapping"),
], ids=["memory-bomb", "path-string", "unknown-key", "unknown-model", "name-type", "student-type", "image-size",
        "config-type"])
def test_eval_refuses_stored_configs_that_are_unsafe_or_malformed(tmp_path, capsys, config, message):
    weights = build_model("small_cnn", width=4).state_dict()
    final = save_checkpoint_file({"format": "rcfast.model/1", "config": config,
                                  "model": {f"backbone.{k}": v for k, v in weights.items()}}, tmp_path / "final.pt")
    assert cli.main(["eval", "--checkpoint", str(final), "--data", str(_task(tmp_path / "task"))]) == 2
    error = one_line_error(capsys.readouterr().err)
    assert re.search(message, error), error


@pytest.mark.parametrize("argv,message", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--knn-k", "0"], "--knn-k values must be >= 1"),
    (["--image-size", "-3"], "--image-size must be >= 1"),
    (["--backbone-kwargs", "{}"], "--backbone-kwargs needs --backbone"),
    (["--backbone", "small_cnn", "--backbone-kwargs", "[1, 2]"], "--backbone-kwargs must be a JSON object"),
    (["--backbone", "small_cnn", "--backbone-kwargs", "{width"], "--backbone-kwargs is not valid JSON"),
])
def test_eval_arguments_are_checked(tmp_path, capsys, argv, message):
    final = _final_with_config(tmp_path / "final.pt", "small_cnn", {"width": 4}, build_model("small_cnn", width=4)
                               .state_dict())
    assert cli.main(["eval", "--checkpoint", str(final), "--data", str(_task(tmp_path / "task")), *argv]) == 2
    assert message in one_line_error(capsys.readouterr().err)
