"""HF transformers/torch oracles: tiny random HF models (GPT-2 and Llama/Qwen2/Mistral, every weight perturbed)
saved as HF directories, our exporter's random GPT-2 dir, and HF's own generate on a left-padded batch. torch and
transformers are imported lazily: tests that need them skip without them."""

import jax
import numpy as np
import pytest

from aigc_jax import configs, model
from aigc_jax import tokenizers as tok
from aigc_jax.interop import hf as hf_interop

GPT2_NOISE = 0.1  # large enough that exact vs tanh GELU differ by > 1e-4 in the logits


def torch_or_skip():
    """torch and transformers, imported (or the test skipped) only when an HF oracle is built."""
    return pytest.importorskip("torch"), pytest.importorskip("transformers")


def build_hf_gpt2(path, vocab_size, n_positions=64, seed=0):
    """A tiny random GPT2LMHeadModel with every weight (LayerNorms and biases too) perturbed, saved to `path`.

    The large init keeps next-token distributions far from uniform, so greedy/beam choices are not near-ties
    that fp32 rounding could flip between implementations.
    """
    torch, transformers = torch_or_skip()
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=32, n_layer=2, n_head=2,
                                  bos_token_id=0, eos_token_id=0, initializer_range=0.3)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    m.save_pretrained(path)
    return m


def hf_generate(m, prompts, max_new_tokens, eos_ids, pad_id=None, **kwargs):
    """HF's generate on a left-padded batch; generated ids padded to max_new_tokens with the pad id."""
    torch, _ = torch_or_skip()
    pad_id = eos_ids[0] if pad_id is None else pad_id
    P = max(map(len, prompts))
    ids = torch.full((len(prompts), P), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    with torch.no_grad():
        out = m.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=list(eos_ids),
                         pad_token_id=pad_id, **kwargs)[:, P:].numpy()
    full = np.full((out.shape[0], max_new_tokens), pad_id)  # num_return_sequences: rows p*n + j
    full[:, : out.shape[1]] = out
    return full


def save_random_hf_gpt2(path, with_tokenizer=True):
    """An HF GPT-2 dir written by our exporter (no torch needed): random weights far from uniform, and a byte-level
    tokenizer (257 ids, <|endoftext|> = 256)."""
    cfg = configs.get_preset("tiny").replace(n_positions=48)
    params = jax.tree.map(lambda x: x * 3, model.init_params(cfg, jax.random.key(5)))
    hf_interop.save_hf_dir(path, cfg, params, tok.byte_level() if with_tokenizer else None)
    return str(path)


def load_hf_model(path):
    _, transformers = torch_or_skip()
    return transformers.GPT2LMHeadModel.from_pretrained(path).eval()


def make_hf_model(directory, seed=0, **shape):
    """A random GPT2LMHeadModel with every weight perturbed, saved to `directory`; returned in eval mode."""
    torch, transformers = torch_or_skip()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(bos_token_id=None, eos_token_id=None, **shape)
    hf_model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(torch.randn_like(p) * GPT2_NOISE)
    hf_model.save_pretrained(str(directory))
    return hf_model


BASE = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def transformers_or_skip():
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


def make_hf(directory, kind, seed=0, noise=0.1, **kwargs):
    """A random {kind}ForCausalLM with every weight perturbed, saved to `directory`; returned in eval mode."""
    import torch

    transformers = transformers_or_skip()
    torch.manual_seed(seed)
    config = getattr(transformers, f"{kind}Config")(**{**BASE, **kwargs})
    m = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * noise)
    m.save_pretrained(str(directory))
    return m
