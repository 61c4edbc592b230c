"""Logits processors and the sampler against HF transformers' warpers (the oracle), plus sampling statistics."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aigc_jax import configs, model
from aigc_jax.decode import GenerationConfig, Generator
from aigc_jax.decode.sampling import make_knobs, penalize, row_keys, sample, seen_in_prompts, suppress_eos, warp
from aigc_jax.errors import UserError



def _hf():
    """torch and HF's logits processors, for the oracle comparisons only (the statistics tests need neither)."""
    return pytest.importorskip("torch"), pytest.importorskip("transformers.generation.logits_process")


@functools.partial(jax.jit, static_argnames=("use_top_k", "use_top_p", "use_min_p"))
def _warp(logits, knobs, use_top_k, use_top_p, use_min_p):
    return warp(logits, knobs, use_top_k, use_top_p, use_min_p)


def ours(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    knobs = make_knobs(GenerationConfig(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p), 16)
    return np.asarray(_warp(jnp.asarray(logits), knobs, use_top_k=top_k > 0, use_top_p=top_p < 1,
                            use_min_p=min_p > 0))


def hf(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """HF's sampling warpers in the order and under the conditions `generate` builds them (min_tokens_to_keep=1)."""
    torch, logits_process = _hf()
    scores = torch.tensor(logits)
    if temperature != 1.0:
        scores = logits_process.TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = logits_process.TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = logits_process.TopPLogitsWarper(top_p)(None, scores)
    if min_p:
        scores = logits_process.MinPLogitsWarper(min_p)(None, scores)
    return scores.numpy()


def probs(scores):
    s = np.asarray(scores, np.float64)
    e = np.exp(s - s.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


SETTINGS = [
    dict(temperature=0.7),
    dict(top_k=1),
    dict(top_k=7),
    dict(top_k=500),  # larger than the vocabulary
    dict(top_p=0.9),
    dict(top_p=0.3),
    dict(top_p=1e-6),  # keeps only the most likely id
    dict(temperature=1.3, top_k=20, top_p=0.8),
    dict(temperature=0.5, top_k=50, top_p=0.95),
    dict(min_p=0.1),
    dict(min_p=1.0),  # keeps only the most likely id
    dict(temperature=0.6, min_p=0.05),  # after temperature: a colder distribution removes more
    dict(temperature=1.5, top_k=40, top_p=0.9, min_p=0.2),
]


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_warpers_equal_hf_on_random_logits(setting):
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((6, 300)) * rng.uniform(0.5, 4, (6, 1))).astype(np.float32)
    logits[0, :5] = -np.inf  # already-suppressed ids (e.g. EOS under min_new_tokens)
    got, ref = ours(logits, **setting), hf(logits, **setting)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref))
    keep = np.isfinite(ref)
    np.testing.assert_allclose(got[keep], ref[keep], rtol=1e-6)
    # Every filtering setting really removes ids here (else the comparison above would be vacuous).
    removed = np.isneginf(ref) & np.isfinite(logits)
    assert removed.any() == (set(setting) != {"temperature"} and setting.get("top_k", 0) < 300)


@pytest.mark.parametrize("setting", [dict(top_k=5), dict(top_k=12, top_p=0.7), dict(top_p=0.5), dict(top_p=0.75)])
def test_warpers_with_tied_logits(setting):
    # Values from a 6-element set: big tie groups straddle the top-k and top-p boundaries.
    rng = np.random.default_rng(1)
    logits = rng.choice(np.float32([-2.0, -1.0, 0.0, 0.5, 1.0, 2.0]), (8, 40)).astype(np.float32)
    got, ref = ours(logits, **setting), hf(logits, **setting)
    if "top_p" not in setting:
        # top-k keeps every id tied with the k-th value: fully determined, so ids must match exactly.
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref))
    # Within a tie group cut by the top-p boundary HF keeps whichever members its (unstable) sort puts last;
    # the kept multiset of values, hence the distribution up to relabelling equal logits, must agree.
    for g, r in zip(got, ref):
        np.testing.assert_array_equal(np.sort(g[np.isfinite(g)]), np.sort(r[np.isfinite(r)]))


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_is_hfs_over_unpadded_prompt_tokens(penalty):
    """HF v5 leaves the left padding out of the penalised ids (prompt_ignore_length from the attention mask)."""
    torch, logits_process = _hf()
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal((4, 50)) * 3).astype(np.float32)
    tokens = rng.integers(0, 50, (4, 9))
    pads = np.array([0, 3, 8, 5])
    mask = np.arange(9) >= pads[:, None]
    tokens[~mask] = 7  # the pad id: penalised in no row unless it really occurs after the padding
    proc = logits_process.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=torch.tensor(pads))
    ref = proc(torch.tensor(tokens), torch.tensor(logits)).numpy()
    seen = seen_in_prompts(jnp.asarray(tokens), jnp.asarray(mask), 50)
    got = np.asarray(penalize(jnp.asarray(logits), seen, jnp.float32(penalty)))
    np.testing.assert_allclose(got, ref, rtol=1e-6)
    assert (got != logits).any() and (got == logits).any()  # some ids penalised, others not
    assert int(seen[2].sum()) == 1  # row 2 is all padding but its last token


def test_suppress_eos_is_hf_min_new_tokens():
    torch, logits_process = _hf()
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((3, 50)).astype(np.float32)
    eos = np.int32([4, 9])
    proc = logits_process.MinNewTokensLengthLogitsProcessor(2, min_new_tokens=3, eos_token_id=[4, 9])
    for generated in range(5):
        ids = torch.zeros((3, 2 + generated), dtype=torch.long)
        ref = proc(ids, torch.tensor(logits)).numpy()
        got = np.asarray(suppress_eos(jnp.asarray(logits), jnp.asarray(eos), jnp.asarray(generated < 3)))
        np.testing.assert_array_equal(got, ref)


def _chi_square_ok(counts, expected_probs, n):
    """Pearson's chi-square with cells of expected count < 5 pooled, against the 1e-4 upper quantile
    (Wilson-Hilferty approximation: accurate to a few % for df >= 3)."""
    expected = expected_probs * n
    big = expected >= 5
    obs = np.append(counts[big], counts[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    z = 3.719  # one-sided 1e-4
    threshold = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat, threshold


def test_sampler_frequencies_fit_the_filtered_distribution():
    rng = np.random.default_rng(3)
    logits_V = (rng.standard_normal(60) * 2).astype(np.float32)
    setting = dict(temperature=0.8, top_k=25, top_p=0.9)
    target = probs(hf(logits_V[None], **setting))[0]
    n = 40_000
    knobs = make_knobs(GenerationConfig(**setting, seed=7), 16)

    @jax.jit
    def draw(logits_NxV, row_ids):
        return sample(warp(logits_NxV, knobs, True, True), row_keys(knobs.seed, row_ids, jnp.int32(0)))

    ids = np.asarray(draw(jnp.broadcast_to(jnp.asarray(logits_V), (n, 60)), jnp.arange(n)))
    counts = np.bincount(ids, minlength=60)
    assert counts[target == 0].sum() == 0, "sampled an id that top-k/top-p removed"
    stat, threshold = _chi_square_ok(counts, target, n)
    assert stat < threshold, (stat, threshold)
    # The test has power: the unfiltered softmax is rejected by the same statistic.
    stat_wrong, _ = _chi_square_ok(counts, probs(logits_V[None] / 0.8)[0], n)
    assert stat_wrong > threshold


@pytest.fixture(scope="module")
def tiny():
    cfg = configs.get_preset("tiny").replace(vocab_size=50, n_positions=32)
    params = model.init_params(cfg, jax.random.key(0))
    # Larger weights than GPT-2's init so that the next-token distribution is far from uniform.
    params = jax.tree.map(lambda x: x * 3, params)
    return cfg, params, Generator(cfg, params)


def test_generated_first_tokens_fit_hf_warped_model_distribution(tiny):
    cfg, params, gen = tiny
    prompt = [3, 14, 15, 9, 2]
    logits, _ = model.forward(params, jnp.asarray([prompt]), cfg)
    setting = dict(temperature=0.9, top_k=30, top_p=0.95)
    target = probs(hf(np.asarray(logits[:, -1, : cfg.vocab_size]), **setting))[0]
    n = 4096
    out, _ = gen.generate_padded([prompt] * n, GenerationConfig(max_new_tokens=1, seed=11, **setting))
    counts = np.bincount(out[:, 0], minlength=cfg.vocab_size)
    assert counts[target == 0].sum() == 0
    stat, threshold = _chi_square_ok(counts, target, n)
    assert stat < threshold, (stat, threshold)
    stat_wrong, _ = _chi_square_ok(counts, probs(np.asarray(logits[0, -1, : cfg.vocab_size]) / 0.9), n)
    assert stat_wrong > threshold  # the unfiltered distribution is rejected: the check has power


def test_seeded_sampling_is_reproducible_and_row_local(tiny):
    _, _, gen = tiny
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9], [10]]
    g = GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=40, seed=5)
    a = gen.generate(prompts, g)
    assert gen.generate(prompts, g) == a
    assert gen.generate(prompts, g.replace(seed=6)) != a
    # A row's samples depend on (seed, its index), not on the other rows or the batch size.
    assert gen.generate(prompts[:1], g) == a[:1]
    assert len({tuple(x) for x in a}) == 3


def test_generation_config_errors():
    check = lambda **kw: GenerationConfig(**kw).check(64, 100, [3])
    for kwargs, needle in [
        (dict(top_p=0.0), "--top-p"),
        (dict(top_p=1.5), "--top-p"),
        (dict(top_k=-1), "--top-k"),
        (dict(temperature=-0.1), "--temperature"),
        (dict(num_beams=0), "--num-beams"),
        (dict(max_new_tokens=0), "--max-new-tokens"),
        (dict(max_new_tokens=63), "context of 64"),
        (dict(num_beams=2, top_k=5), "beam sampling"),
        (dict(eos_ids=(100,)), "outside the vocabulary"),
        (dict(early_stopping="sometimes"), "--early-stopping"),
        (dict(min_p=1.5), "--min-p"),
        (dict(repetition_penalty=0.0), "--repetition-penalty"),
        (dict(num_beams=2, min_p=0.1), "beam sampling"),
        (dict(num_return_sequences=2), "greedy decoding has one answer"),
        (dict(num_return_sequences=3, num_beams=2), "more than the 2 beams"),
        (dict(temperature=1.0, num_return_sequences=0), "--num-return-sequences"),
        (dict(stop_strings=[""]), "stop strings must be non-empty"),
    ]:
        with pytest.raises(UserError, match=needle):
            check(**kwargs)
    with pytest.raises(UserError, match="empty"):
        GenerationConfig().check(64, 100, [0])
    check(max_new_tokens=62, top_p=1.0, num_beams=3, temperature=0)  # the limits themselves are fine
