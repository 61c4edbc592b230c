"""The serving engine alone (no HTTP): continuous batching against offline `Generator` (greedy and sampled, more
sequences than slots, mixed knobs), compiles bounded by warm-up, cancellation, the queue limit, shutdown, prompt
scoring against the project's loss; and the text stream (stop strings, partial UTF-8)."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from aigc_jax import configs, model
from aigc_jax.decode import GenerationConfig, Generator
from aigc_jax.serve.engine import Engine
from aigc_jax.serve.sequences import (CANCELLED, LENGTH, SHUTDOWN, STOP, EngineClosed, QueueFull, RequestError,
                                      Sampling, Scored, Sequence, Tokens)
from aigc_jax.prompts import TextStream
from aigc_jax.train.step import loss_sums

EOS = 7


@pytest.fixture(scope="module")
def tiny():
    cfg = configs.get_preset("tiny").replace(vocab_size=61, n_positions=48)
    params = jax.jit(model.init_params, static_argnums=0)(cfg, jax.random.key(0))
    return cfg, jax.tree.map(lambda x: x * 3, params)  # far from uniform next-token distributions


@pytest.fixture(scope="module")
def engine(tiny):
    eng = Engine(*tiny, eos_ids=(EOS,), max_batch=4, max_queue=64, chunk=4, max_prefill=2).start()
    eng.warmup()
    yield eng
    eng.close()


class Collector:
    """Records each sequence's events in arrival order; `wait()` returns once all of them finished."""

    def __init__(self):
        self.tokens, self.finish, self.order = {}, {}, []
        self.lock, self.done = threading.Lock(), threading.Event()
        self.expected = 0

    def emitter(self, key):
        def emit(event):
            with self.lock:
                if isinstance(event, Tokens):
                    self.tokens.setdefault(key, []).extend(event.ids)
                else:
                    self.finish[key] = event.reason
                    self.order.append(key)
                    if len(self.finish) == self.expected:
                        self.done.set()
        return emit

    def sequence(self, key, prompt, max_tokens, **kw):
        self.expected += 1
        return Sequence(prompt, max_tokens, self.emitter(key), **kw)

    def wait(self, timeout=120):
        assert self.done.wait(timeout), f"only {len(self.finish)} of {self.expected} sequences finished"
        return self


def test_mixed_batch_equals_offline_generate_without_recompiling(tiny, engine):
    cfg, params = tiny
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 61, n).tolist() for n in (3, 7, 1, 12, 5, 20, 9, 2, 30, 4, 17, 6)]
    compiled = engine.stats()["compiles"]
    sample = dict(temperature=0.9, top_k=20, top_p=0.9, seed=4)
    got = Collector()
    seqs = []
    for i, p in enumerate(prompts):  # 24 sequences for 4 slots: most join while others decode
        seqs.append(got.sequence((i, "greedy"), p, 15, logprobs=i % 3 == 0))
        seqs.append(got.sequence((i, "sample"), p, 15, sampling=Sampling(**sample, row=i % 2)))
    engine.submit(seqs)
    got.wait()
    gen = Generator(cfg, params)
    greedy = gen.generate(prompts, GenerationConfig(max_new_tokens=15, temperature=0, eos_ids=(EOS,)))
    for i, p in enumerate(prompts):
        assert got.tokens[(i, "greedy")] == greedy[i]
        # Row r of an offline batch of the same prompt draws with the key a sequence with row=r uses.
        rows = gen.generate([p, p], GenerationConfig(max_new_tokens=15, eos_ids=(EOS,), **sample))
        assert got.tokens[(i, "sample")] == rows[i % 2]
        for kind in ("greedy", "sample"):
            assert got.finish[(i, kind)] == (STOP if got.tokens[(i, kind)][-1] == EOS else LENGTH)
    assert engine.stats()["compiles"] == compiled  # every shape came from the warm-up's buckets
    assert engine.stats()["busy_slots"] == 0 and engine.stats()["queued"] == 0


def test_short_requests_join_and_leave_while_a_long_one_decodes(engine):
    got = Collector()
    long = got.sequence("long", [1, 2, 3], 40, ignore_eos=True)
    engine.submit([long])
    shorts = [got.sequence(f"short{i}", [4 + i, 5], 2, ignore_eos=True) for i in range(6)]
    engine.submit(shorts)  # 6 short sequences through the 3 other slots, two rounds, while "long" runs
    got.wait()
    assert got.order[-1] == "long" and len(got.tokens["long"]) == 40
    assert all(len(got.tokens[f"short{i}"]) == 2 for i in range(6))


def test_cancel_frees_the_slot_and_ends_the_sequence(engine):
    got = Collector()
    record = got.emitter("c")
    got.expected = 1  # "c"; got.sequence below counts "w"

    def cancel_on_first_tokens(event):  # deterministic: cancel while it runs, right after its first chunk
        record(event)
        if isinstance(event, Tokens):
            engine.cancel(running)

    running = Sequence([1, 2], 40, cancel_on_first_tokens, ignore_eos=True)
    waiting = got.sequence("w", [3], 40, ignore_eos=True)
    engine.submit([running])
    engine.submit([waiting])
    engine.cancel(waiting)  # still waiting (or just admitted): never decodes to its end
    got.wait()
    assert got.finish["c"] == CANCELLED and len(got.tokens["c"]) == engine.chunk
    assert got.finish["w"] == CANCELLED and len(got.tokens.get("w", [])) < 40
    assert engine.stats()["busy_slots"] == 0 and engine.stats()["queued"] == 0


def test_bad_sequences_are_refused_before_queueing(engine):
    with pytest.raises(RequestError, match="context"):
        engine.submit([Sequence([1] * 40, 10, print)])  # 40 + 10 - 1 > 48
    with pytest.raises(RequestError, match="vocabulary"):
        engine.submit([Sequence([1, 99], 2, print)])
    with pytest.raises(RequestError, match="empty"):
        engine.submit([Sequence([], 2, print)])
    assert engine.stats()["queued"] == 0


def test_queue_limit_and_shutdown(tiny):
    eng = Engine(*tiny, eos_ids=(EOS,), max_batch=4, max_queue=2, chunk=4, max_prefill=2).start()
    with pytest.raises(QueueFull):  # all or nothing: three do not fit in two waiting places
        eng.submit([Sequence([i], 2, print) for i in range(3)])
    assert eng.stats()["queued"] == 0
    got, gate = Collector(), threading.Event()
    record = got.emitter("a")
    got.expected = 1

    def hold(event):  # keeps the engine thread inside its first chunk's hand-out until close() was called
        record(event)
        if isinstance(event, Tokens):
            gate.wait(60)

    eng.submit([Sequence([1], 40, hold, ignore_eos=True)])
    closer = threading.Thread(target=eng.close, kwargs={"grace_s": 0})
    for _ in range(1200):  # bounded: the first tokens (after the first compile), then close() under way
        if got.tokens.get("a") and closer.ident is None:
            closer.start()
        if eng.stats()["closing"]:
            break
        gate.wait(0.05)
    gate.set()
    closer.join(60)
    got.wait()
    assert got.finish["a"] == SHUTDOWN and len(got.tokens["a"]) < 40  # no grace: it ended unfinished
    assert not eng.alive
    with pytest.raises(EngineClosed):
        eng.submit([Sequence([1], 2, print)])


def test_score_equals_the_project_loss(tiny, engine):
    cfg, params = tiny
    prompt = np.random.default_rng(3).integers(0, 61, 21).tolist()
    box, done = [], threading.Event()
    engine.score(prompt, lambda e: (box.append(e), done.set()))
    assert done.wait(60)
    (scored,) = box
    assert isinstance(scored, Scored) and len(scored.logprobs) == len(prompt) - 1 == len(scored.top) - 1
    nll, _ = loss_sums(params, {"tokens": jnp.asarray([prompt]), "loss_mask": jnp.ones((1, len(prompt) - 1))}, cfg)
    assert sum(scored.logprobs) == pytest.approx(-float(nll), abs=1e-4)
    logits, _ = model.forward(params, jnp.asarray([prompt]), cfg)
    best = np.asarray(jnp.argmax(logits[0, :, :61], -1))
    assert [t[0][0] for t in scored.top] == best.tolist()


# ------------------------------------------------------------------------------------------------ text


def _bytes_tokenizer():
    from aigc_jax import tokenizers

    return tokenizers.byte_level()


def test_text_stream_stop_strings_and_partial_characters():
    tok = _bytes_tokenizer()
    ids = list("héllo wörld. Bye".encode())
    stream = TextStream(tok.decode, stop=["ld.", "zzz"])
    pieces = [stream.add([t]) for t in ids]
    assert "".join(pieces) + stream.finish() == "héllo wör"
    assert stream.stopped and tok.decode(stream.ids) == "héllo wörld."  # ends at the token completing "ld."
    assert all("\ufffd" not in p for p in pieces)  # half a UTF-8 character is never released
    early = TextStream(tok.decode, stop=["ld."])
    early.add(list("héllo wörl".encode()))
    assert early.text == "héllo wö"  # "rl" could still start "ld." and waits (the longest stop, less one)
    plain = TextStream(tok.decode)
    assert "".join(plain.add([t]) for t in ids) + plain.finish() == "héllo wörld. Bye"
    cut = TextStream(tok.decode)
    assert cut.add(list("é".encode())[:1]) == "" and cut.finish() == "\ufffd"  # a dangling byte shows at the end
