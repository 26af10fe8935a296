"""IE-KD: the factor auto-encoder, the channel split and the losses, each against its formula.

The formulas are written here again, independently of rcfast (numpy in float64),
from the issue's definitions: ``n(x) = x.flatten(1) / ||x.flatten(1)||_2``;
inheritance ``mean |n(s) - n(t)|``; exploration ``-mean |n(s) - n(t)|``,
``mean_b |cos(s_b, t_b)|`` or linear CKA ``||T^T S||_F^2 / (||S^T S||_F ||T^T T||_F)``
of the batch-centred ``[B, D]`` matrices.
"""
import numpy as np
import pytest
import torch
from torch import nn

from rcfast.losses import IEKDLoss, exploration_loss, inheritance_loss
from rcfast.losses.iekd import ChannelSplit, IEKDOutput, linear_cka
from rcfast.models import FactorAutoEncoder, pretrain_factor_autoencoder
from rcfast.models.autoencoder import ConvCoder, reconstruction_loss

# Tiny tensors: one thread is faster than two fighting over a loaded machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def _np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().reshape(x.shape[0], -1).numpy()


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt((x ** 2).sum(axis=1, keepdims=True))


def formula_inheritance(s, t) -> float:
    return float(np.abs(_unit_rows(_np(s)) - _unit_rows(_np(t))).mean())


def formula_cos(s, t) -> float:
    s, t = _np(s), _np(t)
    cos = (s * t).sum(1) / (np.linalg.norm(s, axis=1) * np.linalg.norm(t, axis=1))
    return float(np.abs(cos).mean())


def formula_cka(s, t) -> float:
    s, t = _np(s), _np(t)
    s, t = s - s.mean(0), t - t.mean(0)
    return float(np.linalg.norm(t.T @ s, "fro") ** 2
                 / (np.linalg.norm(s.T @ s, "fro") * np.linalg.norm(t.T @ t, "fro")))


def _factors(shape, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


# ----------------------------------------------------------------------------- the losses' values
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (1, 7), (6, 2, 1, 3), (3, 1)])
def test_inheritance_and_l1_exploration_match_formula(shape):
    s, t = _factors(shape, seed=1)
    expected = formula_inheritance(s, t)
    assert inheritance_loss(s, t).item() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert exploration_loss(s, t, "l1").item() == pytest.approx(-expected, rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (1, 7), (5, 2)])
def test_cos_exploration_matches_formula(shape):
    s, t = _factors(shape, seed=2)
    assert exploration_loss(s, t, "cos").item() == pytest.approx(formula_cos(s, t), rel=1e-12)


@pytest.mark.parametrize("shape", [(8, 2, 3, 3), (16, 3), (2, 40), (33, 4, 2, 2), (3, 1)],
                         ids=["gram-path", "feature-path", "B2", "B>D", "D1"])
def test_cka_exploration_matches_formula(shape):
    # Both code paths (Gram [B, B] when B <= D, features [D, D] otherwise) against one formula.
    s, t = _factors(shape, seed=3)
    t = t + 0.5 * s  # some shared structure, so the value is not near 0
    assert exploration_loss(s, t, "cka").item() == pytest.approx(formula_cka(s, t), rel=1e-10)


def test_cka_properties():
    s, t = _factors((10, 6), seed=4)
    assert linear_cka(s, s).item() == pytest.approx(1.0, rel=1e-12)
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    # invariant to rotations and isotropic scaling of either side, and to a shift of a column
    assert linear_cka(s @ q * 3.0 + 1.0, t).item() == pytest.approx(linear_cka(s, t).item(), rel=1e-10)
    assert 0.0 <= linear_cka(s, t).item() <= 1.0
    assert linear_cka(s, torch.randn(10, 3, dtype=torch.float64)).shape == ()  # different widths are fine


def test_constant_factor_gives_zero_cka_and_finite_gradient():
    s = torch.ones(4, 5, dtype=torch.float64, requires_grad=True)  # constant over the batch: centred to 0
    t = torch.randn(4, 5, dtype=torch.float64)
    value = exploration_loss(s, t, "cka")
    value.backward()
    assert value.item() == 0.0
    assert torch.isfinite(s.grad).all()


def test_zero_factor_gives_finite_losses():
    s = torch.zeros(3, 4, dtype=torch.float64, requires_grad=True)
    t = torch.randn(3, 4, dtype=torch.float64)
    for kind in ("l1", "cos"):
        value = exploration_loss(s, t, kind)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(s.grad).all()
    # n(0) is taken as 0 (the norm is clamped), so the inheritance loss is mean |n(t)|
    assert inheritance_loss(s, t).item() == pytest.approx(float(np.abs(_unit_rows(_np(t))).mean()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["inherit", "l1", "cos", "cka"])
def test_low_precision_inputs_are_computed_in_float32(dtype, kind):
    s64, t64 = _factors((6, 2, 3, 3), seed=5)
    s, t = s64.to(dtype), t64.to(dtype)

    def loss(a, b):
        return inheritance_loss(a, b) if kind == "inherit" else exploration_loss(a, b, kind)

    value = loss(s, t)
    assert value.dtype == torch.float32
    # the same math on the rounded inputs in float64: only float32 rounding apart
    assert value.item() == pytest.approx(loss(s.double(), t.double()).item(), rel=1e-5, abs=1e-6)
    s.requires_grad_(True)
    loss(s, t).backward()
    assert s.grad.dtype == dtype


# ----------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("kind", ["inherit", "l1", "cos", "cka"])
@pytest.mark.parametrize("shape", [(3, 2, 2, 2), (6, 3)], ids=["B<D", "B>D"])
def test_gradcheck_float64(kind, shape):
    s, t = _factors(shape, seed=6)
    s.requires_grad_(True)
    t.requires_grad_(True)

    def loss(a, b):
        return inheritance_loss(a, b) if kind == "inherit" else exploration_loss(a, b, kind)

    assert torch.autograd.gradcheck(loss, (s, t), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradgradcheck(loss, (s, t), eps=1e-6, atol=1e-6)


def test_gradcheck_linear_cka_both_paths():
    for shape in ((6, 9), (9, 4)):
        x, y = _factors(shape, seed=7)
        assert torch.autograd.gradcheck(linear_cka, (x.requires_grad_(), y.requires_grad_()), eps=1e-6, atol=1e-8)


def test_gradcheck_iekd_module_float64():
    torch.manual_seed(0)
    loss_fn = IEKDLoss(4, 3, split="random", seed=1, exploration="cka", inherit_weight=0.7,
                       explore_weight=0.3).double()
    feats = torch.randn(3, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 3, 2, 2, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda f: loss_fn(f, teacher).loss, (feats,), eps=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- the split
def test_natural_split_is_first_and_second_half():
    split = ChannelSplit(6, "natural")
    x = torch.arange(6.0).view(1, 6, 1, 1).expand(2, 6, 3, 3)
    inherit, explore = split(x)
    assert inherit[0, :, 0, 0].tolist() == [0, 1, 2] and explore[0, :, 0, 0].tolist() == [3, 4, 5]


def test_random_split_is_a_seeded_permutation_from_a_private_generator():
    rng_before = torch.get_rng_state()
    a, b, c = ChannelSplit(16, "random", seed=5), ChannelSplit(16, "random", seed=5), ChannelSplit(16, "random", seed=6)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is untouched
    both = torch.cat([a.inherit_index, a.explore_index])
    assert sorted(both.tolist()) == list(range(16))
    assert torch.equal(a.inherit_index, b.inherit_index)
    assert not torch.equal(a.inherit_index, c.inherit_index)
    assert not torch.equal(a.inherit_index, torch.arange(8))  # 1 in 16!/8!8! chance of being natural


def test_random_split_is_saved_and_restored_with_the_model():
    trained = IEKDLoss(8, 4, split="random", seed=11)
    fresh = IEKDLoss(8, 4, split="random", seed=99)
    assert "split.inherit_index" in trained.state_dict()
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.split.inherit_index, trained.split.inherit_index)
    assert torch.equal(fresh.split.explore_index, trained.split.explore_index)


def test_loaded_split_must_partition_the_channels():
    state = IEKDLoss(8, 4, split="random", seed=1).state_dict()
    state["split.inherit_index"] = torch.tensor([0, 1, 2, 2])
    with pytest.raises(ValueError, match="partition of range"):
        IEKDLoss(8, 4, split="random", seed=1).load_state_dict(state)


def test_odd_channel_count_is_an_error_unless_the_halves_are_given():
    with pytest.raises(ValueError, match=r"channels=7 is odd.*inherit_channels"):
        ChannelSplit(7, "natural")
    with pytest.raises(ValueError, match=r"channels=7 is odd"):
        IEKDLoss(7, 4, split="random")
    split = ChannelSplit(7, "natural", inherit_channels=3)  # the release's floor(C / 2)
    assert split.inherit_index.tolist() == [0, 1, 2] and split.explore_index.tolist() == [3, 4, 5, 6]
    loss_fn = IEKDLoss(7, 2, inherit_channels=3)
    assert loss_fn.inherit_encoder.in_channels == 3 and loss_fn.explore_encoder.in_channels == 4


@pytest.mark.parametrize("kwargs, match", [
    ({"channels": 1}, "channels must be an int >= 2"),
    ({"channels": 8, "mode": "relation"}, "split mode must be one of"),
    ({"channels": 8, "inherit_channels": 8}, r"inherit_channels must be an int in \[1, 7\]"),
    ({"channels": 8, "inherit_channels": 0}, r"inherit_channels must be"),
])
def test_split_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ChannelSplit(**kwargs)


def test_split_rejects_wrong_channel_count():
    with pytest.raises(ValueError, match=r"features must be \[B, 8"):
        ChannelSplit(8)(torch.randn(2, 6, 3, 3))


# ----------------------------------------------------------------------------- IEKDLoss
@pytest.mark.parametrize("exploration", ["l1", "cos", "cka"])
def test_iekd_loss_is_the_weighted_sum_of_its_parts(exploration):
    torch.manual_seed(0)
    loss_fn = IEKDLoss(6, 3, split="random", seed=2, exploration=exploration, inherit_weight=2.0,
                       explore_weight=0.25)
    feats = torch.randn(5, 6, 4, 4, requires_grad=True)
    teacher = torch.randn(5, 3, 4, 4, requires_grad=True)
    out = loss_fn(feats, teacher)
    assert isinstance(out, IEKDOutput)
    inherit_factor, explore_factor = loss_fn.factors(feats)
    assert out.inherit.item() == pytest.approx(formula_inheritance(inherit_factor, teacher), rel=1e-5)
    expected_explore = {"l1": -formula_inheritance(explore_factor, teacher),
                        "cos": formula_cos(explore_factor, teacher),
                        "cka": formula_cka(explore_factor, teacher)}[exploration]
    assert out.explore.item() == pytest.approx(expected_explore, rel=1e-5)
    assert out.loss.item() == pytest.approx(2.0 * out.inherit.item() + 0.25 * out.explore.item(), rel=1e-6)
    out.loss.backward()
    assert teacher.grad is None  # the teacher factor is a target
    assert feats.grad is not None and feats.grad.abs().sum() > 0
    for encoder in (loss_fn.inherit_encoder, loss_fn.explore_encoder):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())


def test_iekd_loss_each_part_sees_only_its_own_channels():
    torch.manual_seed(0)
    loss_fn = IEKDLoss(8, 4, split="random", seed=3)
    feats = torch.randn(3, 8, 2, 2, requires_grad=True)
    loss_fn(feats, torch.randn(3, 4, 2, 2)).inherit.backward()
    touched = feats.grad.abs().sum(dim=(0, 2, 3)) > 0
    assert touched.nonzero().flatten().tolist() == sorted(loss_fn.split.inherit_index.tolist())


@pytest.mark.parametrize("bad", [
    lambda: exploration_loss(torch.randn(2, 3), torch.randn(2, 3), kind="l2"),
    lambda: IEKDLoss(8, 4, exploration="mse"),
])
def test_unknown_exploration_kind(bad):
    with pytest.raises(ValueError, match=r"must be one of \('l1', 'cos', 'cka'\)"):
        bad()


@pytest.mark.parametrize("loss", [inheritance_loss, lambda s, t: exploration_loss(s, t, "cos"),
                                  lambda s, t: exploration_loss(s, t, "cka")])
def test_factor_shapes_that_differ(loss):
    with pytest.raises(ValueError, match=r"student_factor \(4, 3, 2, 2\) and teacher_factor \(4, 3, 3, 3\)"):
        loss(torch.randn(4, 3, 2, 2), torch.randn(4, 3, 3, 3))


def test_iekd_loss_rejects_teacher_factor_of_other_width():
    loss_fn = IEKDLoss(8, 4)
    with pytest.raises(ValueError, match="same shape"):
        loss_fn(torch.randn(3, 8, 2, 2), torch.randn(3, 5, 2, 2))


@pytest.mark.parametrize("call, error, match", [
    (lambda: inheritance_loss(torch.randn(3), torch.randn(3)), ValueError, "student_factor must be"),
    (lambda: inheritance_loss(torch.randn(0, 3), torch.randn(0, 3)), ValueError, "B > 0"),
    (lambda: inheritance_loss(torch.ones(2, 3, dtype=torch.long), torch.randn(2, 3)), TypeError, "floating"),
    (lambda: inheritance_loss(torch.randn(2, 3), [[1.0]]), TypeError, "teacher_factor must be a tensor"),
    (lambda: exploration_loss(torch.randn(1, 3), torch.randn(1, 3), "cka"), ValueError, "at least 2 samples"),
    (lambda: IEKDLoss(8, 4, inherit_weight=-1.0), ValueError, "inherit_weight must be a float >= 0"),
    (lambda: IEKDLoss(8, 0), ValueError, "out_channels must be a positive int"),
])
def test_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ----------------------------------------------------------------------------- the auto-encoder
def test_autoencoder_layers_follow_the_release():
    ae = FactorAutoEncoder(12, 5)
    for coder, channels in ((ae.encoder, [(12, 12), (12, 5), (5, 5)]), (ae.decoder, [(5, 5), (5, 12), (12, 12)])):
        convs = [m for m in coder.modules() if isinstance(m, nn.Conv2d)]
        assert [(c.in_channels, c.out_channels) for c in convs] == channels
        assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is None for c in convs)
        assert sum(isinstance(m, nn.BatchNorm2d) for m in coder.modules()) == 3
        relus = [m for m in coder.modules() if isinstance(m, nn.LeakyReLU)]
        assert len(relus) == 4 and all(r.negative_slope == 0.1 for r in relus)
    factor, reconstruction = ae(torch.randn(2, 12, 7, 5))
    assert factor.shape == (2, 5, 7, 5) and reconstruction.shape == (2, 12, 7, 5)
    assert torch.equal(ae.encode(torch.ones(2, 12, 7, 5)), ae(torch.ones(2, 12, 7, 5))[0])


def test_reconstruction_loss_is_mean_absolute_error():
    a, b = _factors((3, 4, 2, 2), seed=8)
    assert reconstruction_loss(a, b).item() == pytest.approx(float(np.abs(a.numpy() - b.numpy()).mean()))
    with pytest.raises(ValueError, match="same shape"):
        reconstruction_loss(a, b[:, :2])


def test_pretraining_reduces_the_reconstruction_error_and_freeze_fixes_the_encoder():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    # features with structure a small auto-encoder can learn: low-rank channel mixing
    basis = torch.randn(3, 16, generator=g)
    batches = [torch.relu(torch.einsum("bkhw,kc->bchw", torch.randn(8, 3, 4, 4, generator=g), basis))
               for _ in range(4)]
    ae = FactorAutoEncoder(16, 4)
    losses = pretrain_factor_autoencoder(ae, batches, steps=80, lr=1e-2)
    assert len(losses) == 80  # the four batches were cycled through
    assert np.mean(losses[-4:]) < 0.7 * np.mean(losses[:4])

    ae.freeze()
    assert not ae.training and not any(p.requires_grad for p in ae.parameters())
    parent = nn.ModuleDict({"teacher_ae": ae}).train()
    assert not parent["teacher_ae"].training  # a frozen auto-encoder keeps its BatchNorm statistics
    before = ae.encode(batches[0])
    ae.encode(batches[1])
    assert torch.equal(ae.encode(batches[0]), before)


def test_pretraining_draws_no_global_random_numbers():
    batches = [torch.randn(4, 6, 3, 3) for _ in range(2)]
    ae = FactorAutoEncoder(6, 2)
    state = torch.get_rng_state()
    pretrain_factor_autoencoder(ae, batches, steps=3)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("call, match", [
    (lambda ae: pretrain_factor_autoencoder(ae, [], steps=2), "yielded no batch"),
    (lambda ae: pretrain_factor_autoencoder(ae, (x for x in [torch.randn(2, 6, 3, 3)]), steps=2), "re-iterable"),
    (lambda ae: pretrain_factor_autoencoder(ae, [torch.randn(2, 6, 3, 3)], steps=0), "steps must be"),
    (lambda ae: pretrain_factor_autoencoder(ae, [torch.randn(2, 5, 3, 3)], steps=1), r"\[B, 6, H, W\]"),
    (lambda ae: FactorAutoEncoder(0, 3), "in_channels must be a positive int"),
])
def test_pretraining_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call(FactorAutoEncoder(6, 2))


def test_conv_coder_is_usable_as_student_encoder():
    coder = ConvCoder(4, 3)
    assert coder(torch.randn(2, 4, 3, 3)).shape == (2, 3, 3, 3)


def test_autoencoder_from_state_dict_round_trips_and_rejects_other_dicts():
    torch.manual_seed(0)
    ae = FactorAutoEncoder(10, 3)
    ae(torch.randn(4, 10, 2, 2))  # moves the BatchNorm statistics away from their initial values
    copy = FactorAutoEncoder.from_state_dict(ae.state_dict())
    assert (copy.in_channels, copy.factor_channels) == (10, 3)
    for key, value in ae.state_dict().items():
        assert torch.equal(copy.state_dict()[key], value), key
    with pytest.raises(ValueError, match="not a FactorAutoEncoder state_dict"):
        FactorAutoEncoder.from_state_dict({"weight": torch.ones(3)})
    broken = dict(ae.state_dict())
    del broken["decoder.layers.1.weight"]
    with pytest.raises(ValueError, match="does not load"):
        FactorAutoEncoder.from_state_dict(broken)


@pytest.mark.slow  # a fresh Python subprocess
def test_import_rcfast_loads_neither_iekd_nor_the_models():
    """IE-KD and DMC are loaded on first use, so ``import rcfast`` stays the fused loss alone."""
    import os
    import subprocess
    import sys

    import rcfast.losses
    import rcfast.losses.dmc
    import rcfast.losses.iekd

    code = ("import sys, rcfast; print(sorted(m for m in sys.modules "
            "if m.startswith(('rcfast.models', 'rcfast.losses.iekd', 'rcfast.losses.dmc'))))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    assert rcfast.losses.IEKDLoss is rcfast.losses.iekd.IEKDLoss
    assert rcfast.losses.double_distill_loss is rcfast.losses.dmc.double_distill_loss
    assert set(rcfast.losses.__all__) <= set(dir(rcfast.losses))
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        rcfast.losses.nothing  # noqa: B018
