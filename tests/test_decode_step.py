"""The pieces every decoder shares: the bounded cache of compiled programs (decode/executables.py) and the one token
choice (sampling.select) with per-row knobs, as the serving engine uses it, against per-call knobs, as offline
generation uses it."""

import jax
import jax.numpy as jnp
import numpy as np

from aigc_jax.decode import generate, sampling
from aigc_jax.decode.config import Features, GenerationConfig
from aigc_jax.decode.executables import MAX_SIZE, Executables
from aigc_jax.serve import programs


def test_the_cache_keeps_only_the_most_recently_used_entries():
    cache = Executables(max_size=3)
    built = []

    def build(key):
        return lambda entry: built.append(key) or key.upper()

    for key in "abc":
        cache.get(key, build(key))
    assert cache.get("a", build("a")).value == "A"  # a hit: nothing built, and "a" is now the most recent
    cache.get("d", build("d"))
    assert len(cache) == 3 and "b" not in cache and all(k in cache for k in "acd")
    assert built == list("abcd")
    cache.get("b", build("b"))  # evicted: built again, and the oldest ("c") goes
    assert built[-1] == "b" and "c" not in cache and len(cache) == 3


def test_every_decoder_compiles_into_one_bounded_cache():
    for cache in (generate._PROGRAMS, programs._JITTED):
        assert isinstance(cache, Executables) and cache.max_size == MAX_SIZE


def test_an_entry_counts_traces_not_calls():
    cache = Executables(max_size=2)
    entry = cache.get("add", lambda entry: jax.jit(entry.counted(lambda x: x + 1)))
    entry.value(jnp.zeros(3))
    entry.value(jnp.ones(3))
    assert entry.traces == 1
    entry.value(jnp.zeros(4))  # a new shape: a new trace
    assert entry.traces == 2
    cache.get("other", lambda e: None)
    cache.get("third", lambda e: None)
    assert "add" not in cache and entry.traces == 2  # evicted: whoever holds the entry still reads its count


SETTINGS = [dict(temperature=0.7, top_k=5, top_p=0.9, seed=3), dict(temperature=1.3, top_p=0.5, seed=8),
            dict(temperature=1.0, top_k=1, seed=1), dict(temperature=0.0, seed=0)]


def test_per_row_knobs_choose_what_per_call_knobs_choose():
    """One batch whose rows each carry their own knobs (the server's way) picks, row for row, what a batch with
    that row's knobs for every row picks (offline generation's way), with the same keys."""
    rng = np.random.default_rng(0)
    B, V = len(SETTINGS), 50
    logits_BxV = jnp.asarray(rng.standard_normal((B, V)) * 3, jnp.float32)
    rows_B, step = jnp.arange(B, dtype=jnp.int32) + 5, jnp.int32(7)
    per_call = [sampling.make_knobs(GenerationConfig(**s), 16) for s in SETTINGS]
    stack = lambda name: np.stack([getattr(k, name) for k in per_call])
    per_row = sampling.Knobs(temperature=stack("temperature"), top_k=np.where(stack("top_k") > 0, stack("top_k"), V),
                             top_p_threshold=stack("top_p_threshold"), seed=stack("seed"),
                             greedy=np.array([s["temperature"] == 0 for s in SETTINGS]), row=np.asarray(rows_B),
                             eos_ids=np.int32([-1]))
    mixed = Features(sample=True, mixed=True, top_k=True, top_p=True)
    got = np.asarray(sampling.select(logits_BxV, per_row, mixed, step))
    for i, (s, knobs) in enumerate(zip(SETTINGS, per_call)):
        features = Features(sample=s["temperature"] > 0, top_k=s.get("top_k", 0) > 0, top_p=s.get("top_p", 1) < 1)
        want = sampling.select(logits_BxV, knobs, features, step, rows_B=rows_B)
        assert got[i] == int(want[i]), (i, s)
    # Not a vacuous check: the settings draw differently from the argmax somewhere.
    assert (got != np.asarray(jnp.argmax(logits_BxV, -1))).any()
