"""Quantized bases (QLoRA): the base model's linear layers held in 4-bit NF4 / FP4 or in int8 by bitsandbytes.

``Quantization`` is what a run asks for (``quantization``, ``compute_dtype``, ``double_quant`` in its config).
``models.load_model`` quantizes a model folder while loading it (transformers' bitsandbytes loader: one layer at a
time, so the full-precision model is never held whole); ``quantize`` does the same to a model already in memory (the
tiny test model, a random benchmark model) through the same loader, so both give the same bytes.
``prepare_for_training`` is PEFT's k-bit preparation, ``dequantize`` reads a quantized layer's weight back in float32
(FRLoRA's start, the exports). bitsandbytes is an optional dependency (``pip install 'fedmomentum[qlora]'``):
nothing here imports it until a quantized model is asked for.

The output embedding (``lm_head``, tied or not) stays unquantized, as transformers leaves it.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

__all__ = ["KINDS", "Quantization", "dequantize", "is_quantized", "kind_of", "prepare_for_training", "quantize",
           "require_bitsandbytes", "settle"]

KINDS = ("nf4", "fp4", "int8")
_WEIGHT_TYPES = ("Params4bit", "Int8Params")  # bitsandbytes' quantized weight classes


@dataclass(frozen=True)
class Quantization:
    """How the base's linear layers are held: ``kind`` (nf4 | fp4 | int8); for 4-bit, the dtype they compute in and
    whether the quantization constants are quantized too (double quantization, QLoRA's default)."""

    kind: str
    compute_dtype: torch.dtype = torch.float32
    double_quant: bool = True

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"quantization must be none, {', '.join(KINDS)}; got {self.kind!r}")

    @property
    def bits(self) -> int:
        return 8 if self.kind == "int8" else 4

    def bnb_config(self):
        """The ``transformers.BitsAndBytesConfig`` for it."""
        require_bitsandbytes(self.kind)
        from transformers import BitsAndBytesConfig

        if self.kind == "int8":
            return BitsAndBytesConfig(load_in_8bit=True)
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=self.kind,
                                  bnb_4bit_use_double_quant=self.double_quant,
                                  bnb_4bit_compute_dtype=self.compute_dtype)


def require_bitsandbytes(kind: str = "nf4") -> None:
    """A one-line error when bitsandbytes is missing."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise ImportError(f"quantization={kind} needs bitsandbytes: pip install 'fedmomentum[qlora]' "
                          "(bitsandbytes==0.50.0)") from None
    _quiet_int8_cast_warning()


def quantize(model: PreTrainedModel, quantization: Quantization, device: str | torch.device = "cpu",
             dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A quantized copy of an in-memory model, on ``device``; its other weights (embeddings, norms, ``lm_head``) in
    ``dtype`` (default: the model's). Loaded from the model's state dict by transformers, as a folder would be."""
    require_bitsandbytes(quantization.kind)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):  # a GGUF file's, say: the model in memory is plain floats
        del config.quantization_config
    quantized = type(model).from_pretrained(None, config=config, state_dict=model.state_dict(),
                                            quantization_config=quantization.bnb_config(),
                                            device_map=str(torch.device(device)), dtype=dtype or model.dtype)
    settle(quantized)
    quantized.eval()
    return quantized


@torch.no_grad()
def settle(model: torch.nn.Module) -> None:
    """Make a freshly quantized model hold only its own memory, and keep its 4-bit weights as they were quantized.

    Its unquantized tensors (embeddings, norms) may still be views of the memory-mapped checkpoint file, which keeps
    the whole file mapped, every page the quantization read included: they are copied out, so the map is released.
    And on a CPU with AVX512-BF16, bitsandbytes repacks a 4-bit weight for its CPU kernel at the first forward pass
    without gradients and stores the scales in bfloat16 from then on, which would change the model between training
    and evaluation (and from one CPU to another): that repacking is turned off.
    """
    seen = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) not in seen and type(tensor).__name__ not in _WEIGHT_TYPES and tensor.device.type == "cpu":
            seen.add(id(tensor))
            tensor.data = tensor.data.clone()
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def prepare_for_training(model: PreTrainedModel) -> PreTrainedModel:
    """PEFT's k-bit preparation: freeze the base and hold its unquantized weights (embeddings, norms, ``lm_head``) in
    float32 for stable training. (Activation checkpointing is the run's ``gradient_checkpointing``, set apart.)"""
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def kind_of(model: PreTrainedModel) -> str:
    """How a model's linear layers are quantized (nf4 | fp4 | int8), or ``none``."""
    settings = getattr(model.config, "quantization_config", None)
    if settings is None or not any(is_quantized(m) for m in model.modules()):
        return "none"
    settings = settings if isinstance(settings, dict) else settings.to_dict()
    return "int8" if settings.get("load_in_8bit") else str(settings.get("bnb_4bit_quant_type"))


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes-quantized linear layer (its weight a ``Params4bit`` or ``Int8Params``)."""
    weight = getattr(module, "weight", None)
    return weight is not None and type(weight).__name__ in _WEIGHT_TYPES


@torch.no_grad()
def dequantize(module: torch.nn.Module) -> torch.Tensor:
    """A quantized layer's weight, ``out×in``, in float32 on its device: exactly what its forward pass multiplies by
    (up to the compute dtype)."""
    from peft.utils.integrations import dequantize_bnb_weight

    weight = module.weight
    if getattr(getattr(weight, "quant_state", None), "packing_format_for_cpu", False):
        raise ValueError("a 4-bit weight repacked for bitsandbytes' CPU kernel; quantize through fedmomentum "
                         "(quantization.settle) so it keeps its format")
    return dequantize_bnb_weight(weight, state=getattr(module, "state", None)).float()


class _Int8CastFilter(logging.Filter):
    """bitsandbytes logs "inputs will be cast ... to float16" at every int8 matmul of float32 inputs (each layer,
    each step); the cast is how int8 layers work, said once in docs/gpu.md."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "inputs will be cast from" not in record.getMessage()


def _quiet_int8_cast_warning() -> None:
    log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _Int8CastFilter) for f in log.filters):
        log.addFilter(_Int8CastFilter())
