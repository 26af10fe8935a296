"""``mutual_learning``: a peer network trained with the student, each mimicking the other (DML), optionally with IE-KD.

Deep mutual learning (Zhang et al., 2018) trains two networks together, each
with its task loss plus the KL divergence from the other's softened
prediction. This term owns the second network (the *peer*): its parameters
train with the student's (one optimiser), are averaged over DDP ranks and are
saved in the checkpoints. With ``iekd``, the two networks also inherit from and
explore away from each other's factors, IE-KD's second use in its paper:

- each network has a :class:`~rcfast.models.FactorAutoEncoder` on its own
  feature map, trained online to reconstruct it (L1; the features are detached,
  so the reconstruction does not pull on the networks), whose factor is the
  *other* network's target;
- each network has an :class:`~rcfast.losses.IEKDLoss` (its split and
  student-side encoders) against the other's (detached) factor.

The student's own task loss is another term (``cross_entropy``). Options (YAML
``{term: mutual_learning, ...}``):

- ``peer_backbone``, ``peer_backbone_kwargs``: the peer's architecture (a
  registered name, ``torchvision:`` or ``timm:``); it gets one head like the
  student's ``head``.
- ``peer_seed``: the seed of the peer's initial weights (default 1); a peer
  identical to the student would learn nothing from it.
- ``head``: the student head (default: the only one); ``data``: the labeled
  stream (default: the head's task stream if there is one, else ``proxy``).
- ``temperature`` (default 1.0, as DML), ``kl_weight`` (the student's KL to the
  peer), ``peer_ce_weight``, ``peer_kl_weight``: all default 1.0. KL terms are
  ``tau^2 KL(softmax(other/tau) || softmax(own/tau))``, batch mean, with the
  other network's logits as a constant.
- ``iekd``: optional ``{student_layer, peer_layer, factor_channels,
  exploration: l1|cos|cka, split: natural|random, seed, inherit_weight,
  explore_weight, reconstruction_weight, warmup_steps}`` (weights default 1.0;
  ``warmup_steps`` ramps the inherit/explore weights linearly from the start).

Loss: ``kl_weight KL_student + peer_ce_weight CE_peer + peer_kl_weight KL_peer``
``+ ramp (IE_student + IE_peer) + reconstruction_weight (rec_student + rec_peer)``;
the parts are logged. Both networks step together on this sum, each receiving
only its own terms' gradients (the other side is detached), rather than in
DML's alternating updates.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn.functional as F

from rcfast.losses.iekd import EXPLORATION_KINDS, SPLIT_MODES, IEKDLoss
from rcfast.models.autoencoder import FactorAutoEncoder, reconstruction_loss
from rcfast.models.registry import build_student
from rcfast.ops.multihead_kd import multihead_kd_loss
from rcfast.train.hooks import LayerCapture
from rcfast.train.objectives.base import Term, TermSetup, register_term
from rcfast.train.objectives.factor_reconstruction import feature_map_shape
from rcfast.train.objectives.inputs import Images, Labels, StepInputs, StudentLayer, StudentLogits
from rcfast.train.objectives.options import check_warmup_steps, nonnegative, only_head, warmup_factor

__all__ = ["MutualLearning"]

_IEKD_DEFAULTS = {"exploration": "l1", "split": "natural", "seed": 0, "inherit_weight": 1.0,
                  "explore_weight": 1.0, "reconstruction_weight": 1.0, "warmup_steps": 0}
_IEKD_REQUIRED = ("student_layer", "peer_layer", "factor_channels")


def _iekd_options(iekd) -> dict | None:
    if iekd is None:
        return None
    if not isinstance(iekd, Mapping):
        raise TypeError(f"iekd must be a mapping of IE-KD options, got {iekd!r}")
    unknown = [k for k in iekd if k not in _IEKD_DEFAULTS and k not in _IEKD_REQUIRED]
    missing = [k for k in _IEKD_REQUIRED if k not in iekd]
    if unknown or missing:
        raise ValueError(f"iekd: unknown options {unknown}, missing {missing}; valid: "
                         f"{list(_IEKD_REQUIRED) + list(_IEKD_DEFAULTS)}")
    options = {**_IEKD_DEFAULTS, **iekd}
    for key in ("student_layer", "peer_layer"):
        if not isinstance(options[key], str) or not options[key]:
            raise ValueError(f"iekd.{key} must name a layer, got {options[key]!r}")
    channels = options["factor_channels"]
    if isinstance(channels, bool) or not isinstance(channels, int) or channels <= 0:
        raise ValueError(f"iekd.factor_channels must be a positive int, got {channels!r}")
    if options["exploration"] not in EXPLORATION_KINDS:
        raise ValueError(f"iekd.exploration must be one of {EXPLORATION_KINDS}, got {options['exploration']!r}")
    if options["split"] not in SPLIT_MODES:
        raise ValueError(f"iekd.split must be one of {SPLIT_MODES}, got {options['split']!r}")
    for key in ("inherit_weight", "explore_weight", "reconstruction_weight"):
        options[key] = nonnegative(f"iekd.{key}", options[key])
    options["warmup_steps"] = check_warmup_steps(options["warmup_steps"])
    return options


def _softened_kl(own: torch.Tensor, other: torch.Tensor, temperature: float, backend: str) -> torch.Tensor:
    # The other network's prediction is the target: multihead_kd_loss detaches it.
    return multihead_kd_loss(own, other, temperature=temperature, reduction="batchmean", backend=backend)


@register_term("mutual_learning")
class MutualLearning(Term):
    """A peer network and the DML (+ optional IE-KD) losses between it and the student."""

    def __init__(self, peer_backbone: str, peer_backbone_kwargs: Mapping | None = None, peer_seed: int = 1,
                 head: str | None = None, data: str | None = None, temperature: float = 1.0,
                 kl_weight: float = 1.0, peer_ce_weight: float = 1.0, peer_kl_weight: float = 1.0,
                 iekd: Mapping | None = None) -> None:
        super().__init__()
        if not isinstance(peer_backbone, str) or not peer_backbone:
            raise ValueError(f"peer_backbone must name a model, got {peer_backbone!r}")
        if peer_backbone_kwargs is not None and not isinstance(peer_backbone_kwargs, Mapping):
            raise TypeError(f"peer_backbone_kwargs must be a mapping, got {peer_backbone_kwargs!r}")
        if isinstance(peer_seed, bool) or not isinstance(peer_seed, int):
            raise TypeError(f"peer_seed must be an int, got {peer_seed!r}")
        if head is not None and not isinstance(head, str):
            raise TypeError(f"head must be a head name, got {head!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
        self.peer_backbone, self.peer_backbone_kwargs = peer_backbone, dict(peer_backbone_kwargs or {})
        self.peer_seed, self.head, self.data, self.temperature = peer_seed, head, data, float(temperature)
        self.kl_weight = nonnegative("kl_weight", kl_weight)
        self.peer_ce_weight = nonnegative("peer_ce_weight", peer_ce_weight)
        self.peer_kl_weight = nonnegative("peer_kl_weight", peer_kl_weight)
        self.iekd_options = _iekd_options(iekd)

    def bind(self, setup: TermSetup) -> None:
        head = only_head(setup, self.head)
        stream = setup.stream(self.data if self.data is not None else (head if head in setup.streams else None))
        self.images_key = setup.need(Images(stream))
        self.labels_key = setup.need(Labels(stream))
        self.logits_key = setup.need(StudentLogits(stream, (head,)))
        self.backend = setup.loss_backend
        # Built from its own seed, leaving the caller's RNG as it was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.peer_seed)
            self.peer = build_student(self.peer_backbone, {head: setup.heads[head]}, **self.peer_backbone_kwargs)
        options = self.iekd_options
        if options is None:
            return
        self.student_layer_key = StudentLayer(stream, options["student_layer"])
        self.peer_layer = options["peer_layer"]
        # An unknown layer name fails now, listing the valid ones.
        LayerCapture(self.peer, [self.peer_layer], owner="the peer")
        student_shape = feature_map_shape(setup, self.student_layer_key, "the student's")
        peer_shape = self._peer_feature_shape(setup)
        if student_shape[2:] != peer_shape[2:]:
            raise setup.error(f"factor shapes differ: the student layer {options['student_layer']!r} gives "
                              f"{tuple(student_shape[2:])} maps, the peer layer {self.peer_layer!r} "
                              f"{tuple(peer_shape[2:])}")
        factor = options["factor_channels"]
        iekd_kwargs = {"split": options["split"], "seed": options["seed"], "exploration": options["exploration"],
                       "inherit_weight": options["inherit_weight"], "explore_weight": options["explore_weight"]}
        try:
            self.student_autoencoder = FactorAutoEncoder(student_shape[1], factor)
            self.peer_autoencoder = FactorAutoEncoder(peer_shape[1], factor)
            self.student_iekd = IEKDLoss(student_shape[1], factor, **iekd_kwargs)
            self.peer_iekd = IEKDLoss(peer_shape[1], factor, **iekd_kwargs)
        except ValueError as exc:
            raise setup.error(f"iekd: {exc}") from exc

    def _peer_feature_shape(self, setup: TermSetup) -> torch.Size:
        images = setup.layout.example_images
        was_training = self.peer.training
        self.peer.eval()
        try:
            with torch.no_grad(), LayerCapture(self.peer, [self.peer_layer], owner="the peer") as captured:
                self.peer(images)
        finally:
            self.peer.train(was_training)
        shape = captured[self.peer_layer].shape
        if len(shape) != 4:
            raise setup.error(f"the peer's layer {self.peer_layer!r} gives a tensor of shape {tuple(shape)}; "
                              "IE-KD needs a feature map [B, C, H, W]")
        return shape

    def _losses(self, step: StepInputs) -> dict[str, torch.Tensor]:
        images, labels = step[self.images_key], step[self.labels_key]
        student_logits = step[self.logits_key].float()
        layers = [self.peer_layer] if self.iekd_options else []
        with LayerCapture(self.peer, layers, owner="the peer") as captured:
            peer_logits = self.peer(images).float()
        losses = {
            "kl_student": _softened_kl(student_logits, peer_logits, self.temperature, self.backend),
            "ce_peer": F.cross_entropy(peer_logits, labels),
            "kl_peer": _softened_kl(peer_logits, student_logits, self.temperature, self.backend),
        }
        if self.iekd_options:
            student_features = step[self.student_layer_key].float()
            peer_features = captured[self.peer_layer].float()
            student_factor, student_reconstruction = self.student_autoencoder(student_features.detach())
            peer_factor, peer_reconstruction = self.peer_autoencoder(peer_features.detach())
            losses["reconstruction"] = (reconstruction_loss(student_reconstruction, student_features.detach())
                                        + reconstruction_loss(peer_reconstruction, peer_features.detach()))
            student_ie = self.student_iekd(student_features, peer_factor)  # IEKDLoss detaches the target
            peer_ie = self.peer_iekd(peer_features, student_factor)
            losses.update(inherit_student=student_ie.inherit, explore_student=student_ie.explore,
                          inherit_peer=peer_ie.inherit, explore_peer=peer_ie.explore,
                          iekd=student_ie.loss + peer_ie.loss)
        return losses

    def forward(self, step: StepInputs) -> torch.Tensor:
        losses = self._losses(step)
        total = (self.kl_weight * losses["kl_student"] + self.peer_ce_weight * losses["ce_peer"]
                 + self.peer_kl_weight * losses["kl_peer"])
        if self.iekd_options:
            options = self.iekd_options
            total = (total + warmup_factor(step.step, options["warmup_steps"]) * losses.pop("iekd")
                     + options["reconstruction_weight"] * losses["reconstruction"])
        # Kept for parts(): recomputing them would run the peer again (and move its BatchNorm statistics).
        self._last_parts = (step.step, {k: v.detach() for k, v in losses.items()})
        return total

    def parts(self, step: StepInputs) -> dict[str, torch.Tensor]:
        """The step's KL, peer cross-entropy (and IE-KD) parts, as computed by its forward."""
        last = getattr(self, "_last_parts", None)
        return dict(last[1]) if last is not None and last[0] == step.step else {}
