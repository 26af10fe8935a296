"""Intermediate features of unmodified models by layer name, through forward hooks.

``with LayerCapture(model, ["backbone.layer4"]) as outputs: model(images)``
leaves ``outputs["backbone.layer4"]`` holding that submodule's output of the
forward. The hooks exist only inside the ``with`` block, so a model is never
left with hooks attached (a deep copy or a later forward is unaffected). Any
model works -- registered, ``torchvision:`` or ``timm:`` -- since layers are
found by their ``named_modules()`` names.
"""
from __future__ import annotations

from typing import Iterable

import difflib

import torch
from torch import nn

__all__ = ["LayerCapture", "unknown_layer_message"]


def unknown_layer_message(owner: str, model: nn.Module, layer: str) -> str:
    """``owner has no layer 'x'``, with close matches first, then the valid names."""
    names = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(layer, names, n=3)
    shown = names if len(names) <= 60 else names[:60] + [f"... ({len(names) - 60} more)"]
    hint = f"; did you mean {close}?" if close else ""
    return f"{owner} has no layer {layer!r}{hint}. Valid layer names: {shown}"


class LayerCapture:
    """Record the outputs of named submodules of ``model`` during the forwards inside a ``with`` block.

    Args:
        model: the module whose submodules are hooked.
        layers: ``named_modules()`` names; an unknown name is a ``ValueError``
            listing the valid ones.
        owner: how error messages refer to the model (e.g. ``"teacher 'a'"``).

    A layer that runs several times in one forward keeps its last output; a
    layer that returns a tuple keeps the tuple's first tensor.
    """

    def __init__(self, model: nn.Module, layers: Iterable[str], owner: str = "the model") -> None:
        modules = dict(model.named_modules())
        self.layers = tuple(dict.fromkeys(layers))
        for layer in self.layers:
            if not layer or layer not in modules:
                raise ValueError(unknown_layer_message(owner, model, layer))
        self._modules = {layer: modules[layer] for layer in self.layers}
        self._handles: list = []
        self.outputs: dict[str, torch.Tensor] = {}

    def __enter__(self) -> dict[str, torch.Tensor]:
        self.outputs = {}
        for layer, module in self._modules.items():
            self._handles.append(module.register_forward_hook(self._hook(layer)))
        return self.outputs

    def _hook(self, layer: str):
        def hook(module, args, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
            self.outputs[layer] = output
        return hook

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
