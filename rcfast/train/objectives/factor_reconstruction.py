"""``factor_reconstruction``: pretrain IE-KD's teacher auto-encoder on a teacher layer's feature map.

Options (YAML ``{term: factor_reconstruction, ...}``):

- ``teacher``: the teacher whose features are encoded (default: the run's only teacher).
- ``layer``: the teacher's layer (a ``named_modules()`` name) giving a feature
  map ``[B, C, H, W]``, e.g. the last stage's activation.
- ``factor_channels``: channels of the factor (the IE-KD terms' factors have as many).
- ``data``: the data stream (default ``proxy``).

Loss: the L1 reconstruction error of a :class:`~rcfast.models.FactorAutoEncoder`
on the (constant) teacher features, as the authors' release pretrains it. The
student is not involved: a run whose objective is this term alone never runs the
student. The trained auto-encoder is stored in the run's checkpoints (under
``objective``), where the ``iekd_inherit`` / ``iekd_explore`` terms load it
from (their ``autoencoder`` option).
"""
from __future__ import annotations

import torch

from rcfast.models.autoencoder import FactorAutoEncoder, reconstruction_loss
from rcfast.train.objectives.base import Term, TermSetup, register_term
from rcfast.train.objectives.inputs import StepInputs, TeacherLayer
from rcfast.train.objectives.options import only_teacher

__all__ = ["FactorReconstruction", "feature_map_shape"]


def feature_map_shape(setup: TermSetup, key, what: str) -> torch.Size:
    """The probed shape of a layer that must give a 4-D feature map."""
    shape = setup.probe(key)
    if len(shape) != 4:
        raise setup.error(f"{what} layer {key.layer!r} gives a tensor of shape {tuple(shape)}; IE-KD needs a "
                          "feature map [B, C, H, W] (a convolutional stage, not the pooled feature vector)")
    return shape


@register_term("factor_reconstruction")
class FactorReconstruction(Term):
    """L1 reconstruction of a teacher layer's feature map by a factor auto-encoder."""

    def __init__(self, layer: str, factor_channels: int, teacher: str | None = None, data: str | None = None) -> None:
        super().__init__()
        if not isinstance(layer, str) or not layer:
            raise ValueError(f"layer must name a teacher layer, got {layer!r}")
        if isinstance(factor_channels, bool) or not isinstance(factor_channels, int) or factor_channels <= 0:
            raise ValueError(f"factor_channels must be a positive int, got {factor_channels!r}")
        self.layer, self.factor_channels, self.teacher, self.data = layer, factor_channels, teacher, data

    def bind(self, setup: TermSetup) -> None:
        teacher = only_teacher(setup, self.teacher)
        self.features_key = TeacherLayer(setup.stream(self.data), teacher, self.layer)
        shape = feature_map_shape(setup, self.features_key, f"teacher {teacher!r}")
        self.autoencoder = FactorAutoEncoder(shape[1], self.factor_channels)

    def forward(self, step: StepInputs) -> torch.Tensor:
        features = step[self.features_key].float()
        _, reconstruction = self.autoencoder(features)
        return reconstruction_loss(reconstruction, features)
