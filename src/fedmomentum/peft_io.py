"""The bridge between a PEFT LoRA model and the method's tensors: read/write factors, add backbone deltas.

Layer keys are module paths without PEFT's wrapper prefix, e.g. ``model.layers.0.self_attn.q_proj``.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from transformers import PreTrainedModel

from .backbone_change import BackboneChange
from .change_branch import ChangeBranch
from .quantization import dequantize, is_quantized
from .types import LoraPair, LowRank

ADAPTER = "default"
PREFIX = "base_model.model."


def add_lora(
    model: PreTrainedModel,
    *,
    r: int = 8,
    alpha: float = 16,
    target_modules: Iterable[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    dropout: float = 0.0,
    rslora: bool = False,
    seed: int = 0,
) -> PeftModel:
    """Wrap ``model`` with LoRA; the initial ``A`` is seeded, so every party builds the same adapter."""
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=dropout,
                        use_rslora=rslora, task_type="CAUSAL_LM")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return get_peft_model(model, config)


def lora_layers(model: PeftModel, adapter: str = ADAPTER) -> dict[str, LoraLayer]:
    """Every LoRA-wrapped module, keyed by its path in the base model."""
    layers = {name.removeprefix(PREFIX): module for name, module in model.named_modules()
              if isinstance(module, LoraLayer) and adapter in module.lora_A}
    if not layers:
        raise ValueError("the model has no LoRA layers; check target_modules")
    return layers


def scaling(model: PeftModel, adapter: str = ADAPTER) -> float:
    """The LoRA scaling ``s`` (``alpha/r`` or ``alpha/√r``); one value for the whole model."""
    values = {float(layer.scaling[adapter]) for layer in lora_layers(model, adapter).values()}
    if len(values) != 1:
        raise ValueError(f"layers use different LoRA scalings {sorted(values)}; use one r and alpha")
    return values.pop()


def rank_adapter(model: PeftModel, rank: int) -> str:
    """The name of an adapter of rank ``rank`` on ``model`` (the run's own adapter, or one added beside it with the
    same settings), for clients of another rank. Training one leaves the others untouched: only the active adapter
    takes part in the forward pass."""
    config = model.peft_config[ADAPTER]
    if rank == config.r:
        return ADAPTER
    name = f"rank{rank}"
    if name not in model.peft_config:
        other = copy.deepcopy(config)
        other.r = rank
        with torch.random.fork_rng():  # its initial values are never used: clients set their factors first
            model.add_adapter(name, other)
        set_trainable(model, {"A": False, "B": False}, name)
        model.set_adapter(ADAPTER)
        set_trainable(model, {"A": False, "B": False})
    return name


@contextlib.contextmanager
def active_adapter(model: PeftModel, adapter: str):
    """Make ``adapter`` the one the forward pass uses, and the run's own adapter again afterwards (even on error)."""
    if adapter == ADAPTER:
        yield adapter
        return
    model.set_adapter(adapter)
    try:
        yield adapter
    finally:
        model.set_adapter(ADAPTER)
        set_trainable(model, {"A": False, "B": False})


def get_lora(model: PeftModel, adapter: str = ADAPTER) -> dict[str, LoraPair]:
    """The adapter's factors as float32 CPU copies."""
    return {
        name: LoraPair(layer.lora_A[adapter].weight.detach().float().cpu().clone(),
                       layer.lora_B[adapter].weight.detach().float().cpu().clone())
        for name, layer in lora_layers(model, adapter).items()
    }


@torch.no_grad()
def set_lora(model: PeftModel, lora: dict[str, LoraPair], adapter: str = ADAPTER) -> None:
    """Copy factors into the model (its dtype and device); every layer must be given, with matching shapes."""
    layers = lora_layers(model, adapter)
    missing, extra = sorted(set(layers) - set(lora)), sorted(set(lora) - set(layers))
    if missing or extra:
        raise ValueError(f"adapter layers do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, layer in layers.items():
        for factor, value in (("A", lora[name].A), ("B", lora[name].B)):
            weight = getattr(layer, f"lora_{factor}")[adapter].weight
            if weight.shape != value.shape:
                raise ValueError(f"layer {name!r}: {factor} has shape {tuple(value.shape)}, "
                                 f"the model expects {tuple(weight.shape)}")
            weight.copy_(value)


def set_trainable(model: PeftModel, trainable: dict[str, bool], adapter: str = ADAPTER) -> list[torch.nn.Parameter]:
    """Freeze or unfreeze ``A`` and ``B`` everywhere; returns the parameters left trainable."""
    params = []
    for layer in lora_layers(model, adapter).values():
        for factor in ("A", "B"):
            weight = getattr(layer, f"lora_{factor}")[adapter].weight
            weight.requires_grad_(trainable[factor])
            if trainable[factor]:
                params.append(weight)
    return params


def _oriented(layer: LoraLayer, delta: LowRank) -> LowRank:
    """``delta`` (an ``out×in`` matrix) in the orientation of the layer's stored weight: ``in×out`` for GPT-2's
    ``Conv1D`` (PEFT's ``fan_in_fan_out``)."""
    return LowRank(delta.right.mT, delta.left.mT) if getattr(layer, "fan_in_fan_out", False) else delta


# --- the backbone: what the method defines, whatever the precision the base model is held in -------------------
#
# A bfloat16 weight cannot take a small delta: ``W + D`` rounds back to ``W`` when ``|D|`` is under half a bf16 ulp
# of ``W`` (about 2^-9 |W|), and errors pile up round after round. So the backbone of the adapted layers is kept as a
# mapping ``layer → tensor`` (the server's ``ServerState.backbone``, a node's own copy): the model's own weight while
# it is float32 or unchanged (the same tensor, no copy), and a float32 master copy once a delta reaches a
# low-precision weight. Deltas are added to that tensor, and the stored weight is the master rounded once, so the
# model never drifts from the float32 backbone. Layers that never receive a delta (every layer of fedit, ffa-lora,
# rolora, flexlora) and float32 weights need no copy; checkpoints carry the mapping, exports round it once.
#
# A quantized layer (4-bit or int8, ``quantization.py``) is not in the mapping: a master would undo the memory its
# quantization saves, and its weight is never rewritten. Its change is a frozen factored branch beside the weight
# (``change_branch.py``), read from a ``BackboneChange`` attached to the model (``attach_change``): the server's
# ``ServerState.change``, a node's own. The caller adds each round's deltas to that ``BackboneChange`` as well as
# calling ``apply_backbone``.


def quantized_layers(model: PeftModel) -> dict[str, LoraLayer]:
    """The adapted layers whose base weight is quantized."""
    return {name: layer for name, layer in lora_layers(model).items() if is_quantized(layer.get_base_layer())}


def backbone_of(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapted layers' backbone as the model holds it now: each unquantized layer's own weight tensor (no copy)."""
    return {name: layer.get_base_layer().weight.data for name, layer in lora_layers(model).items()
            if not is_quantized(layer.get_base_layer())}


def attach_change(model: PeftModel, change: BackboneChange | None) -> None:
    """Make the model's quantized layers compute their backbone change, ``change.deltas``, beside their quantized
    weights from now on (again with another ``change``: a restored checkpoint's). Nothing to do on a model without
    quantized layers; on one with, ``change`` None (a change not tracked) is an error."""
    quantized = quantized_layers(model)
    if not quantized:
        return
    if change is None:
        raise ValueError("a quantized base needs the backbone's whole change (its quantized layers compute it "
                         "beside their weights), and this state does not track it")
    change.keep_tight()  # its width is computed in every forward pass
    branch = _branch(model)
    if branch is None:
        branch = ChangeBranch(change)
        model.__dict__[_BRANCH] = branch  # not a submodule, not a parameter: nothing of it is saved with the model
    else:
        branch.use(change)
    branch.attach({name: layer.get_base_layer() for name, layer in quantized.items()})


_BRANCH = "_fedmomentum_change_branch"


def _branch(model: PeftModel) -> ChangeBranch | None:
    return model.__dict__.get(_BRANCH)


def _shape(layer: LoraLayer) -> tuple[int, int]:
    """The ``out×in`` shape of the layer's weight (a quantized weight is stored packed)."""
    return layer.out_features, layer.in_features


@torch.no_grad()
def apply_backbone(model: PeftModel, deltas: dict[str, LowRank], backbone: dict[str, torch.Tensor]) -> None:
    """``W += left @ right`` for each layer, in place, in float32 whatever the model's dtype.

    ``backbone`` is the model's backbone mapping (``backbone_of``, or what ``set_backbone`` returned): a
    low-precision weight gets a float32 master copy in it on its first delta; the delta goes into the master, the
    weight becomes the master rounded once. A quantized layer is left as it is: its change comes from the
    ``BackboneChange`` attached to the model (``attach_change``), to which the caller adds the same deltas.
    """
    layers = lora_layers(model)
    unknown = sorted(set(deltas) - set(layers))
    if unknown:
        raise ValueError(f"backbone deltas for layers the model does not adapt: {unknown[:3]}")
    branch = _branch(model)
    for name, delta in deltas.items():
        layer = layers[name]
        if delta.shape != _shape(layer):
            raise ValueError(f"layer {name!r}: backbone delta {delta.shape} does not fit weight {_shape(layer)}")
        if is_quantized(layer.get_base_layer()):
            if branch is None:
                raise ValueError(f"layer {name!r} is quantized: its backbone change needs a BackboneChange attached "
                                 "to the model (peft_io.attach_change)")
            continue
        weight = layer.get_base_layer().weight
        stored = _oriented(layer, delta)
        left, right = stored.left.to(weight.device, torch.float32), stored.right.to(weight.device, torch.float32)
        if weight.dtype == torch.float32:
            weight.addmm_(left, right)
            continue
        if backbone[name].dtype != torch.float32:
            backbone[name] = weight.float()
        backbone[name].addmm_(left, right)
        weight.copy_(backbone[name])


@torch.no_grad()
def _effective(model: PeftModel, name: str, layer: LoraLayer) -> torch.Tensor:
    """A quantized layer's backbone as its forward pass computes it: the dequantized weight plus its change, float32,
    ``out×in``, on the layer's device."""
    base = layer.get_base_layer()
    weight = dequantize(base)
    branch = _branch(model)
    delta = branch.delta(name) if branch is not None else None
    if delta is not None:
        weight.addmm_(delta.left.to(weight.device, torch.float32), delta.right.to(weight.device, torch.float32))
    return weight


class BackboneWeights(Mapping):
    """The adapted layers' current base weights as ``out×in`` tensors, read one at a time when asked for (no copy of
    the whole backbone): what ``Method.start`` sees. A quantized layer's is its dequantized weight plus its change
    (float32, built when asked for). Treat them as read-only."""

    def __init__(self, model: PeftModel):
        self._model = model
        self._layers = lora_layers(model)

    def __getitem__(self, name: str) -> torch.Tensor:
        layer = self._layers[name]
        if is_quantized(layer.get_base_layer()):
            return _effective(self._model, name, layer)
        weight = layer.get_base_layer().weight.detach()
        return weight.mT if getattr(layer, "fan_in_fan_out", False) else weight

    def __iter__(self) -> Iterator[str]:
        return iter(self._layers)

    def __len__(self) -> int:
        return len(self._layers)


def get_backbone(model: PeftModel) -> dict[str, torch.Tensor]:
    """The adapted layers' weights as the model stores them, as CPU copies (rounded to the model's dtype); a quantized
    layer's as it computes with it (``BackboneWeights``), in float32."""
    return {name: (_effective(model, name, layer) if is_quantized(layer.get_base_layer())
                   else layer.get_base_layer().weight.detach()).cpu().clone()
            for name, layer in lora_layers(model).items()}


@torch.no_grad()
def set_backbone(model: PeftModel, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Load saved backbone weights (a checkpoint's) into the model; returns the model's backbone mapping (see
    ``apply_backbone``): a value the stored weight cannot hold exactly (float32 into a bfloat16 weight) is kept as
    the layer's float32 master. The weights cover the unquantized adapted layers (a quantized layer's change is
    restored with ``attach_change``)."""
    layers = {name: layer for name, layer in lora_layers(model).items() if not is_quantized(layer.get_base_layer())}
    if set(weights) != set(layers):
        raise ValueError("backbone weights do not cover exactly the unquantized adapted layers")
    backbone = {}
    for name, value in weights.items():
        weight = layers[name].get_base_layer().weight
        if value.shape != weight.shape or not value.is_floating_point():
            raise ValueError(f"layer {name!r}: backbone weight {value.dtype} {tuple(value.shape)} does not fit the "
                             f"model's {tuple(weight.shape)}")
        value = value.to(weight.device)
        weight.copy_(value)
        exact = torch.equal(value.to(weight.dtype).to(value.dtype), value)
        backbone[name] = weight.data if exact else value.float().clone()
    return backbone


def export_adapter(model: PeftModel, folder: str | Path, base: str | Path | None = None) -> None:
    """A PEFT adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``) for the base at ``base``."""
    config = model.peft_config[ADAPTER]
    original = config.base_model_name_or_path
    if base is not None:
        config.base_model_name_or_path = str(base)
    try:
        # not the per-rank client adapters; no embedding layers (never trained), so no look-up of the base on the hub
        model.save_pretrained(str(folder), selected_adapters=[ADAPTER], save_embedding_layers=False)
    finally:
        config.base_model_name_or_path = original


def export_merged(model: PeftModel, folder: str | Path, tokenizer=None, *, merge: bool = True,
                  backbone: dict[str, torch.Tensor] | None = None) -> None:
    """Save the backbone as a plain HF model folder, with the adapter merged in (or, ``merge=False``, without).

    ``merge=False`` gives the updated base that the exported PEFT adapter must be loaded on; ``model`` is
    left untouched either way. Weights are saved in the model's dtype: an adapted layer is its float32 backbone
    (``backbone``, the model's backbone mapping; plus ``s·B·A`` when merging) rounded once. The copy is built on the
    meta device, so no second random init (or float32 copy) of a large model is made.

    A quantized model is saved unquantized, in the dtype it was loaded in (``config.dtype``): each quantized layer
    dequantized, an adapted one with its backbone change (``attach_change``) added; the folder's config has no
    ``quantization_config``, so plain transformers loads it as an ordinary model.
    """
    base = model.get_base_model()
    backbone = backbone or {}
    quantized = {path.replace(".base_layer", ""): module for path, module in base.named_modules()
                 if is_quantized(module)}
    state = {}
    for key, value in base.state_dict().items():
        key = key.replace(".base_layer.", ".")
        if "lora_" in key or _owner(key, quantized) is not None and not key.endswith(".bias"):
            continue  # the adapter; a quantized weight's packed data and quantization state
        state[key] = value.detach().cpu().clone()
    layers = lora_layers(model)
    for path, module in quantized.items():
        if path not in layers:  # an adapted one is done below
            state[f"{path}.weight"] = dequantize(module).cpu()
    config = base.config
    if quantized:
        config = copy.deepcopy(base.config)
        saved_dtype = _dtype(config)
        for attribute in ("quantization_config", "_is_quantized"):
            if hasattr(config, attribute):
                delattr(config, attribute)
        state = {key: value.to(saved_dtype) if value.is_floating_point() else value for key, value in state.items()}
    for name, layer in layers.items():
        key = f"{name}.weight"
        if is_quantized(layer.get_base_layer()):
            weight, dtype = _effective(model, name, layer).cpu(), _dtype(config)
        else:
            weight = backbone[name].float().cpu() if name in backbone else state[key].float()
            dtype = state[key].dtype
        if merge:
            weight = weight + layer.get_delta_weight(ADAPTER).detach().float().cpu()  # PEFT's s·B·A, oriented like W
        state[key] = weight.to(dtype)
    with torch.device("meta"):
        plain = type(base)(config)
    plain.load_state_dict(state, strict=True, assign=True)
    plain.tie_weights()
    plain.save_pretrained(str(folder))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def _owner(key: str, paths: Mapping) -> str | None:
    """The module of ``paths`` that a state-dict key belongs to (its longest dotted prefix there), or None."""
    parts = key.split(".")
    for end in range(len(parts) - 1, 0, -1):
        if ".".join(parts[:end]) in paths:
            return ".".join(parts[:end])
    return None


def _dtype(config) -> torch.dtype:
    """The dtype a model was loaded in, as its config records it."""
    value = getattr(config, "dtype", None) or torch.float32
    return getattr(torch, value) if isinstance(value, str) else value


def save_adapter(folder: str | Path, factors: dict[str, LoraPair], like: LoraConfig, base: str | None) -> None:
    """A PEFT LoRA adapter folder holding ``factors`` as given (``B @ A`` is each layer's whole delta: every layer's
    ``lora_alpha`` equals its own rank, so PEFT's scaling is 1), with the settings of ``like`` and ranks per layer
    (``rank_pattern``), for the base model at ``base``. Written directly: no model is built."""
    if not factors:
        raise ValueError("no layer to put in the adapter")
    ranks = {name: pair.rank for name, pair in factors.items()}
    top = max(ranks.values())
    config = LoraConfig(r=top, lora_alpha=top, target_modules=sorted(factors), rank_pattern=ranks,
                        alpha_pattern={name: float(r) for name, r in ranks.items()}, lora_dropout=like.lora_dropout,
                        fan_in_fan_out=like.fan_in_fan_out, bias="none", task_type=like.task_type,
                        base_model_name_or_path=base)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    tensors = {}
    for name, pair in factors.items():
        tensors[f"{PREFIX}{name}.lora_A.weight"] = pair.A.detach().float().cpu().contiguous()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = pair.B.detach().float().cpu().contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
