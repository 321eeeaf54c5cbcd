"""Model loading: the SmolLM2 safetensors cache, local folders, and the tiny test model."""

from __future__ import annotations

import copy
import time

import pytest
import torch

from fedmomentum import models

CACHE_NAME = models.DEFAULT_CACHE_NAME


@pytest.fixture(scope="module")
def gguf():
    """SmolLM2 loaded straight from the GGUF file (the reference the cache is built from)."""
    return models.load_gguf()


def _sample_ids(tokenizer) -> torch.Tensor:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids


@pytest.mark.slow
def test_cache_build_and_reload_match_gguf(gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMOMENTUM_CACHE", str(tmp_path))
    g_model, g_tok = gguf
    folder = models.build_cache(source=gguf)
    assert folder == tmp_path / CACHE_NAME
    assert sorted(p.name for p in tmp_path.iterdir()) == [CACHE_NAME]  # no temp folder left behind
    assert (folder / "model.safetensors").is_file()

    start = time.perf_counter()
    model, tok = models.load_model()
    load_s = time.perf_counter() - start
    assert load_s < 15, f"cached load took {load_s:.1f}s"
    assert model.dtype == torch.float32 and not model.training

    # Tied embeddings: lm_head is the (GGUF) embedding matrix, and shares storage after reload.
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.lm_head.weight, g_model.model.embed_tokens.weight)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in g_model.parameters())

    # Same tokenizer, same logits.
    ids = _sample_ids(tok)
    assert torch.equal(ids, _sample_ids(g_tok))
    assert tok.pad_token is not None and tok.chat_template == g_tok.chat_template
    with torch.no_grad():
        got = model(ids).logits
        want = g_model(ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # It is the real instruct model: greedy decoding answers the question.
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1] :])

    # A valid cache is reused: building again does not touch the GGUF file.
    monkeypatch.setattr(models, "load_gguf", lambda: pytest.fail("cache was rebuilt"))
    assert models.build_cache() == folder
    assert models.load_tokenizer().pad_token == tok.pad_token


@pytest.mark.slow
def test_cache_build_is_atomic(gguf, tmp_path, monkeypatch):
    target = tmp_path / CACHE_NAME

    def crash(self, save_directory, **kwargs):
        (save_directory / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt("simulated crash while saving")

    with monkeypatch.context() as patch:
        patch.setattr(models.LlamaForCausalLM, "save_pretrained", crash)
        with pytest.raises(KeyboardInterrupt):
            models.build_cache(target, source=gguf)
    assert list(tmp_path.iterdir()) == []

    # A folder that is not a finished cache (no marker) is replaced by a valid one.
    target.mkdir()
    (target / "junk.txt").write_text("left over")
    assert models.build_cache(target, source=gguf) == target
    assert not (target / "junk.txt").exists()
    assert (target / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == [CACHE_NAME]


def test_missing_or_invalid_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        models.load_model(str(missing))
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty-folder"):
        models.load_model(empty)
    stray = tmp_path / "weights.bin"
    stray.write_bytes(b"\0")
    with pytest.raises(ValueError, match="weights.bin"):
        models.load_model(stray)


def test_local_folder_roundtrip_and_pad_fallback(tiny_model, tmp_path):
    model, tok = tiny_model
    tok = copy.deepcopy(tok)
    tok.pad_token = None
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = models.load_model(str(tmp_path))
    assert loaded_tok.pad_token == loaded_tok.eos_token  # eos stands in for the missing pad token
    assert loaded_tok.chat_template
    ids = torch.tensor([[1, 9690, 198, 504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_tiny_model_deterministic(tiny_model):
    rng_before = torch.random.get_rng_state()
    a, tok = models.tiny_model(0)
    b, _ = models.tiny_model(0)
    c, _ = models.tiny_model(1)
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # global RNG untouched
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.layers.0.self_attn.q_proj.weight"], sc["model.layers.0.self_attn.q_proj.weight"])
    fixture_model, _ = tiny_model
    assert all(torch.equal(v, fixture_model.state_dict()[k]) for k, v in sa.items())

    cfg = a.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (2, 64, 4, 2)
    assert cfg.vocab_size == len(tok) == 49152
    assert tok.pad_token is not None and tok.chat_template
    with torch.no_grad():
        logits = a(torch.tensor([[1, 2, 3, 4]])).logits
    assert logits.shape == (1, 4, 49152) and torch.isfinite(logits).all()
    with pytest.raises(ValueError):
        models.tiny_model(0, hidden=65)
