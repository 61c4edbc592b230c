"""Packed rows: several examples in one row, told apart by segment ids, each getting the logits it gets alone."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aigc_jax import configs, model
from aigc_jax.models.cache import attention_mask

forward = jax.jit(model.forward, static_argnames=("config", "train"))

T = 20
PACKS = ((5, 7, 4), (9, 6))  # example lengths per row; the rest of each row is padding
PAD_SEGMENT = 0

GPT2 = configs.get_preset("tiny").replace(vocab_size=101, dtype="float32")
LLAMA = configs.get_preset("llama-tiny").replace(vocab_size=97, dtype="float32")
CASES = {
    "gpt2": GPT2,
    "gpt2-scan-remat": GPT2.replace(scan_layers=True, remat="full"),
    # One full and one sliding layer: both masks, and a window shorter than most examples.
    "llama-mixed-window": LLAMA.replace(sliding_window=3, layer_types=("full_attention", "sliding_attention")),
    "llama-window-scan": LLAMA.replace(sliding_window=3, scan_layers=True),
}


def random_params(config, seed=0):
    """Every parameter (biases and norm scales too) drawn at random: attending across examples then moves the
    logits far beyond the tolerance. Shapes come from tracing the initialiser, which is much cheaper than running it."""
    shapes = jax.eval_shape(lambda: model.init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0.0, 0.1, s.shape).astype(np.float32), shapes)


def pack(examples, packs):
    """(tokens, positions, segment ids) [len(packs), T]: examples laid end to end, positions restarting at 0."""
    shape = (len(packs), T)
    tokens, positions, segments = np.zeros(shape, np.int32), np.zeros(shape, np.int32), np.full(shape, PAD_SEGMENT)
    it = iter(examples)
    for row, lengths in enumerate(packs):
        start = 0
        for segment, n in enumerate(lengths, start=1):
            tokens[row, start:start + n] = next(it)
            positions[row, start:start + n] = np.arange(n)
            segments[row, start:start + n] = segment
            start += n
    return tokens, positions, segments


def unpack(logits, packs):
    """The packed logits cut back into one [n, V] array per example."""
    out = []
    for row, lengths in enumerate(packs):
        starts = np.cumsum((0,) + lengths)
        out += [logits[row, a:b] for a, b in zip(starts[:-1], starts[1:])]
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_packed_examples_get_their_logits_alone(name):
    config = CASES[name]
    params = random_params(config)
    lengths = [n for row in PACKS for n in row]
    rng = np.random.default_rng(1)
    examples = [rng.integers(1, config.vocab_size, n) for n in lengths]
    tokens, positions, segments = pack(examples, PACKS)

    packed, _ = forward(params, tokens, config, positions_BxT=positions, segment_ids_BxT=segments)
    got = unpack(np.asarray(packed), PACKS)

    # Alone: each example at the start of its own row; what follows it cannot reach it through causal attention.
    alone_tokens = np.zeros((len(examples), T), np.int32)
    for i, example in enumerate(examples):
        alone_tokens[i, :len(example)] = example
    alone, _ = forward(params, alone_tokens, config)
    for i, n in enumerate(lengths):
        np.testing.assert_allclose(got[i], np.asarray(alone)[i, :n], atol=1e-5, rtol=0, err_msg=f"example {i}")

    # One segment for the whole row (as without segment ids; the same compiled forward): the later examples then
    # see the earlier ones, so the check above is not vacuous.
    mixed, _ = forward(params, tokens, config, positions_BxT=positions, segment_ids_BxT=np.ones_like(segments))
    assert np.abs(unpack(np.asarray(mixed), PACKS)[1] - got[1]).max() > 1e-2


def test_one_segment_per_row_equals_no_segment_ids():
    config = CASES["llama-mixed-window"]
    params = random_params(config, seed=2)
    tokens = np.random.default_rng(3).integers(0, config.vocab_size, (len(PACKS), T))
    positions = np.broadcast_to(np.arange(T), tokens.shape)  # given, so the packed test's compiled forward serves
    got, _ = forward(params, tokens, config, positions_BxT=positions, segment_ids_BxT=np.full(tokens.shape, 7))
    ref, _ = forward(params, tokens, config)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5, rtol=0)


def test_segment_mask_is_never_the_plain_causal_none_and_refuses_a_cache():
    positions = jnp.arange(4)[None]
    assert attention_mask(positions, None, None) is None  # plain causal: the cuDNN path stays open
    mask = attention_mask(positions, None, None, segment_ids_BxT=jnp.asarray([[1, 1, 2, 2]]))
    assert mask is not None
    np.testing.assert_array_equal(mask[0], [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]])
    cache = model.KVCache.init(GPT2, 1, 8)
    with pytest.raises(ValueError, match="segment_ids_BxT"):
        attention_mask(positions, None, cache, segment_ids_BxT=jnp.ones((1, 4), jnp.int32))


@pytest.mark.parametrize("name", ["gpt2", "llama-mixed-window"])
def test_packed_batch_loss_is_the_sum_of_the_examples_losses(name):
    """The training objective on packed rows ("positions", "segment_ids" in the batch, loss_mask off at example
    boundaries and padding) sums exactly the next-token losses of the examples trained alone."""
    from aigc_jax.train.step import loss_sums

    config = CASES[name]
    params = random_params(config, seed=4)
    lengths = [n for row in PACKS for n in row]
    rng = np.random.default_rng(5)
    examples = [rng.integers(1, config.vocab_size, n) for n in lengths]
    tokens, positions, segments = pack(examples, PACKS)
    # Inputs are tokens[:, :-1] and targets tokens[:, 1:]: a prediction counts when its target is in the same example.
    same = (segments[:, :-1] == segments[:, 1:]) & (segments[:, :-1] != PAD_SEGMENT)
    batch = {"tokens": tokens, "loss_mask": same.astype(np.float32), "positions": positions[:, :-1],
             "segment_ids": segments[:, :-1]}
    nll, weight = jax.jit(loss_sums, static_argnums=2)(params, batch, config)

    alone = np.zeros((len(examples), T), np.int32)
    mask = np.zeros((len(examples), T - 1), np.float32)
    for i, example in enumerate(examples):
        alone[i, :len(example)] = example
        mask[i, :len(example) - 1] = 1.0
    ref_nll, ref_weight = jax.jit(loss_sums, static_argnums=2)(params, {"tokens": alone, "loss_mask": mask}, config)
    assert float(weight) == float(ref_weight) == sum(n - 1 for n in lengths)
    np.testing.assert_allclose(float(nll), float(ref_nll), rtol=1e-5)
