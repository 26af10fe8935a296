"""IE-KD factor auto-encoders: compress a feature map into a *factor*.

Inheritance and exploration KD (arXiv 2107.00181) compares networks through
factors: a feature map ``[B, C, H, W]`` encoded into ``[B, F, H, W]`` by a small
convolutional encoder. The teacher's factor comes from a
:class:`FactorAutoEncoder` pretrained alone to reconstruct the teacher's
features (L1 loss, :func:`pretrain_factor_autoencoder`) and then frozen; the
student's two channel halves each get a :class:`ConvCoder` of their own, trained
with the student (see :class:`rcfast.losses.IEKDLoss`).

The layers follow the authors' release (Apache-2.0): a coder is a LeakyReLU(0.1)
on its input, then three 3x3 convolutions (stride 1, padding 1, no bias), each
followed by BatchNorm and LeakyReLU(0.1), with channels ``cin -> cin -> cout ->
cout``; the decoder mirrors the encoder (``cout -> cout -> cin -> cin``). Spatial
size is kept. Convolutions are initialised ``N(0, 2 / (9 * out_channels))``,
BatchNorm to the identity, as in the release.
"""
from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch
from torch import nn

__all__ = ["ConvCoder", "FactorAutoEncoder", "reconstruction_loss", "pretrain_factor_autoencoder"]

LEAKY_SLOPE = 0.1


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class ConvCoder(nn.Module):
    """Three 3x3 conv + BatchNorm + LeakyReLU(0.1) layers, ``cin -> cin -> cout -> cout``.

    Maps ``[B, in_channels, H, W]`` to ``[B, out_channels, H, W]``. Used as the
    encoder and the decoder of :class:`FactorAutoEncoder` and as the student-side
    encoders of :class:`rcfast.losses.IEKDLoss`.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.in_channels = _positive_int("in_channels", in_channels)
        self.out_channels = _positive_int("out_channels", out_channels)
        layers: list[nn.Module] = [nn.LeakyReLU(LEAKY_SLOPE)]
        for cin, cout in ((in_channels, in_channels), (in_channels, out_channels), (out_channels, out_channels)):
            layers += [nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False), nn.BatchNorm2d(cout),
                       nn.LeakyReLU(LEAKY_SLOPE)]
        self.layers = nn.Sequential(*layers)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected a feature map [B, {self.in_channels}, H, W], got shape {tuple(x.shape)}")
        return self.layers(x)

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}"


class FactorAutoEncoder(nn.Module):
    """Encoder ``in_channels -> factor_channels`` and the mirrored decoder back.

    ``forward(x)`` returns ``(factor, reconstruction)`` with shapes
    ``[B, factor_channels, H, W]`` and ``[B, in_channels, H, W]``. Pretrain it on
    a frozen teacher's features with :func:`pretrain_factor_autoencoder`, then
    call :meth:`freeze` and use :meth:`encode` for the teacher's factor.
    """

    def __init__(self, in_channels: int, factor_channels: int) -> None:
        super().__init__()
        self.encoder = ConvCoder(in_channels, factor_channels)
        self.decoder = ConvCoder(factor_channels, in_channels)

    @property
    def in_channels(self) -> int:
        return self.encoder.in_channels

    @property
    def factor_channels(self) -> int:
        return self.encoder.out_channels

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], strict: bool = True) -> "FactorAutoEncoder":
        """An auto-encoder sized from, and loaded with, a ``state_dict`` of one (channels read from its weights)."""
        first, last = "encoder.layers.1.weight", "encoder.layers.7.weight"
        for key in (first, last):
            weight = state.get(key)
            if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
                raise ValueError(f"not a FactorAutoEncoder state_dict: no 4-D tensor {key!r} "
                                 f"(keys: {sorted(state)[:8]}...)")
        autoencoder = cls(int(state[first].shape[1]), int(state[last].shape[0]))
        try:
            autoencoder.load_state_dict(state, strict=strict)
        except RuntimeError as exc:
            raise ValueError(f"the FactorAutoEncoder state_dict does not load: {exc}") from exc
        return autoencoder

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        factor = self.encoder(x)
        return factor, self.decoder(factor)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The factor alone (no decoder pass)."""
        return self.encoder(x)

    def freeze(self) -> "FactorAutoEncoder":
        """Evaluation mode and no gradients: the teacher side of IE-KD after pretraining.

        A frozen module stays in eval mode (BatchNorm uses its running statistics)
        even when a parent module calls ``train()``.
        """
        self.requires_grad_(False)
        self._frozen = True
        return self.eval()

    def train(self, mode: bool = True) -> "FactorAutoEncoder":
        return super().train(mode and not getattr(self, "_frozen", False))


def reconstruction_loss(reconstruction: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """L1 reconstruction loss ``mean |reconstruction - features|`` (the release's ``RecLoss``)."""
    if reconstruction.shape != features.shape:
        raise ValueError(f"reconstruction {tuple(reconstruction.shape)} and features {tuple(features.shape)} "
                         "must have the same shape")
    return (reconstruction - features).abs().mean()


def pretrain_factor_autoencoder(autoencoder: FactorAutoEncoder, feature_batches: Iterable[torch.Tensor], *,
                                steps: int, lr: float = 1e-3, weight_decay: float = 0.0,
                                optimizer: torch.optim.Optimizer | None = None) -> list[float]:
    """Train ``autoencoder`` to reconstruct feature maps; return the loss of every step.

    Args:
        autoencoder: the :class:`FactorAutoEncoder` to train (left in train mode;
            call ``freeze()`` afterwards to use it as the teacher's encoder).
        feature_batches: an iterable of teacher feature maps ``[B, C, H, W]``
            (already detached, e.g. a frozen teacher's hooked layer); it is
            cycled through again if it runs out before ``steps``.
        steps: number of optimiser steps.
        lr, weight_decay: of the Adam optimiser used when ``optimizer`` is None.

    The run is deterministic given the batches and the auto-encoder's initial
    weights; it draws nothing from any random number generator.
    """
    if not isinstance(autoencoder, FactorAutoEncoder):
        raise TypeError(f"autoencoder must be a FactorAutoEncoder, got {type(autoencoder).__name__}")
    _positive_int("steps", steps)
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    if optimizer is None:
        optimizer = torch.optim.Adam(autoencoder.parameters(), lr=lr, weight_decay=weight_decay)
    autoencoder.train()
    losses: list[float] = []
    while len(losses) < steps:
        before = len(losses)
        for features in feature_batches:
            _, reconstruction = autoencoder(features.detach())
            loss = reconstruction_loss(reconstruction, features.detach())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if len(losses) == steps:
                break
        if len(losses) == before:
            raise ValueError(f"feature_batches yielded no batch after {before} step(s); pass a re-iterable "
                             "(a list or a DataLoader), not a one-shot generator, when steps exceed its length")
    return losses
