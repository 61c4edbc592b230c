"""Edge cases of the notebook API (`aigc_jax.api`) and `Generator`: batch vs single equality, HF-style argument
types (an int EOS, None, NumPy/JAX integers), streaming chunk sizes, and one-line errors for invalid input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aigc_jax import api, configs, model
from aigc_jax import tokenizers as tok
from aigc_jax.decode import GenerationConfig
from aigc_jax.errors import UserError


@pytest.fixture(scope="module")
def lm():
    cfg = configs.get_preset("tiny")  # vocab 257 (byte-level + <|endoftext|>), context 64
    params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
    params = jax.tree.map(lambda x: x * 3, params)  # far from uniform: greedy choices are not near-ties
    return api.LM(cfg, params, tok.byte_level())


def test_batch_equals_single_and_top_k_1_is_greedy(lm):
    # Very different lengths: the batch is left-padded to 64 slots, the short prompts alone to 16.
    prompts = ["a", "x" * 40, "Hi", "Once upon a time", "The"]
    greedy = dict(max_new_tokens=9, temperature=0)
    batch = lm.generate_ids(prompts, **greedy)
    assert [lm.generate_ids(prompts[i], **greedy) for i in (0, 1, 3)] == [batch[i] for i in (0, 1, 3)]
    assert lm.generate_ids(prompts, max_new_tokens=9, top_k=1, seed=3) == batch  # HF: top_k=1 samples the argmax
    assert lm.generate_ids(prompts, max_new_tokens=9, temperature=0, top_k=5, top_p=0.5) == batch  # HF ignores them


def test_hf_style_eos_and_numpy_integers(lm):
    g = dict(max_new_tokens=6, temperature=0)
    free = lm.generate_ids("Hi", eos_ids=(), **g)
    eos = free[2]
    expected = free[: free.index(eos) + 1]
    assert lm.generate_ids("Hi", eos_ids=eos, **g) == expected  # HF's eos_token_id may be one int
    assert lm.generate_ids("Hi", eos_ids=np.array([eos]), **g) == expected
    assert lm.generate_ids("Hi", eos_ids=None, **g) == free  # None: no EOS, as HF's eos_token_id=None
    assert lm.generate_ids("Hi", max_new_tokens=np.int64(6), temperature=0, eos_ids=()) == free
    assert lm.generate_ids(jnp.asarray(lm.encode("Hi")), eos_ids=(), **g) == free  # a JAX array of ids: one prompt
    assert lm.generate((p for p in ["Hi"]), eos_ids=(), **g) == [lm.decode(free)]  # any iterable of prompts
    assert GenerationConfig(eos_ids=[5, np.int32(6)], seed=np.uint32(1)) == GenerationConfig(eos_ids=(5, 6), seed=1)


def test_a_prompt_filling_the_context_is_accepted(lm):
    # The context error above says "at most 64 tokens": a 64-token prompt must indeed yield its one new token.
    assert len(lm.generate_ids([1] * 64, max_new_tokens=1, temperature=0, eos_ids=())) == 1


def test_sampling_draws_a_fresh_seed_per_call_and_reports_it(lm):
    """HF samples afresh on every call; the seed used is reported so any sample can be reproduced."""
    knobs = dict(max_new_tokens=24, temperature=1.0, eos_ids=())
    first = lm.generate_ids("Hi", **knobs)
    seed = lm.last_seed
    second = lm.generate_ids("Hi", **knobs)
    assert isinstance(seed, int) and lm.last_seed != seed
    assert first != second  # 24 draws from a near-uniform 257-way distribution: equal by chance with p ~ 257**-24
    assert lm.generate_ids("Hi", seed=seed, **knobs) == first and lm.last_seed == seed


def test_stream_chunks(lm):
    gen = lm.config_for(max_new_tokens=5, temperature=0, eos_ids=())
    chunks = [c[0] for c in lm.generator.stream([[104, 105]], gen, chunk=1)]
    assert chunks == [[t] for t in lm.generator.generate([[104, 105]], gen)[0]]  # one token each, the first too
    with pytest.raises(UserError, match="--chunk must be a positive integer"):
        list(lm.stream("Hi", chunk=0, max_new_tokens=3))
    with pytest.raises(UserError, match="stream takes one prompt, got 2"):
        list(lm.stream(["Hi", "there"], max_new_tokens=3))


@pytest.mark.parametrize(
    "call, needle",
    [
        (lambda lm: lm.generate_ids([1] * 70, max_new_tokens=1), "shorten it to at most 64 tokens"),
        (lambda lm: lm.generate_ids([1] * 64, max_new_tokens=2), "use at most 1 new tokens"),
        (lambda lm: lm.generate_ids("Hi", seed=1.5), "--seed must be an integer"),
        (lambda lm: lm.generate_ids("Hi", eos_ids=1.5), "eos ids must be an int or a list of ints"),
        (lambda lm: lm.generate_ids("Hi", do_sample=False), "unknown argument 'do_sample'"),
        (lambda lm: lm.encode(["a", "b"]), "can only encode text"),
        (lambda lm: lm.tokenizer.encode_batch("ab"), "encode_batch takes a list of strings"),
        (lambda lm: lm.decode([104, -100]), "cannot decode token id -100"),
        (lambda lm: lm.decode([[104, 105]]), "decode takes one sequence"),
    ],
)
def test_invalid_input_is_a_one_line_user_error(lm, call, needle):
    with pytest.raises(UserError, match=needle) as e:
        call(lm)
    assert "\n" not in str(e.value)
