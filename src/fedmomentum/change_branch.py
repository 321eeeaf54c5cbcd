"""A quantized layer's backbone change, computed as a frozen factored branch beside its quantized weight.

flora, fedex-lora, fedmomentum and frlora add a low-rank delta to the backbone every round. Added into a 4-bit
weight it would be lost: NF4 has 16 levels per block of 64 weights, so a delta far smaller than a level's step
rounds away, round after round (``tests/test_quantization.py`` measures it). A float32 master of the weight would
undo the memory the quantization saves. So a quantized weight is never rewritten: the layer computes

    y = quantized(W₀) x + L (R x) + s·B (A x)

where ``L @ R`` is the layer's whole backbone change so far, read at each forward pass from a ``BackboneChange``
(the server's ``ServerState.change``; a Flower node keeps its own), which keeps it factored at about its numerical
rank. The branch is a forward hook on the quantized base layer, so PEFT's LoRA layer, merging and saving are
untouched; it holds no parameter (nothing to train, nothing in a state dict). Factors are copied to the layer's
device once per change, not per pass.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .backbone_change import BackboneChange
from .types import LowRank


class ChangeBranch:
    """The change that the quantized layers of one model add to their output: ``change.deltas[layer]``, or nothing
    for a layer the change does not hold."""

    def __init__(self, change: BackboneChange):
        self.change = change
        self._on_device: dict[str, tuple[LowRank, torch.Tensor, torch.Tensor]] = {}  # layer → (source, L, R)
        self._hooks: dict[str, torch.utils.hooks.RemovableHandle] = {}

    def attach(self, layers: Mapping[str, torch.nn.Module]) -> None:
        """Hook each of ``layers`` (name → the quantized base layer) once."""
        for name, layer in layers.items():
            if name not in self._hooks:
                self._hooks[name] = layer.register_forward_hook(self._hook(name))

    def use(self, change: BackboneChange) -> None:
        """Read from ``change`` from now on (a restored checkpoint's)."""
        self.change = change
        self._on_device.clear()

    def delta(self, name: str) -> LowRank | None:
        return self.change.deltas.get(name)

    def _factors(self, name: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        delta = self.delta(name)
        if delta is None:
            return None
        cached = self._on_device.get(name)
        if cached is None or cached[0] is not delta or cached[1].device != device:
            # BackboneChange replaces a layer's LowRank whenever it changes: identity says whether the copy is current
            cached = (delta, delta.left.to(device, torch.float32), delta.right.to(device, torch.float32))
            self._on_device[name] = cached
        return cached[1], cached[2]

    def _hook(self, name: str):
        def add_change(module, args, output):
            factors = self._factors(name, output.device)
            if factors is None:
                return output
            left, right = factors
            x = args[0]
            branch = (x.to(right.dtype) @ right.mT) @ left.mT  # float32, unless autocast says otherwise
            return output + branch.to(output.dtype)

        return add_change
