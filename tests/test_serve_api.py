"""`aigc-jax serve` through real clients: the official `openai` package (completions, chat, streaming, n, stop strings,
logprobs, echo) against offline generate, transformers' generate and the project's own loss; malformed requests;
a client that disconnects; the queue limit, the API key and SIGTERM draining on a second, one-slot server."""

import json
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from serve_util import CHAT_TEMPLATE, ServerProcess, call, stream

from aigc_jax import api, chat, model
from aigc_jax.train.step import loss_sums

PROMPTS = ["Hello world", "The meaning of life is", "x", "Once upon a time, in a land far away"]


@pytest.fixture(scope="module")
def lm(serve_model):
    return api.load(str(serve_model))


@pytest.fixture(scope="module")
def client(served):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=120)


def hf_greedy(model_dir, prompts, max_new_tokens):
    """transformers' greedy generate of each prompt (text prompts through the HF tokenizer), as text."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    m = transformers.GPT2LMHeadModel.from_pretrained(model_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tok.eos_token_id)
        out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
    return out


def test_completions_greedy_equal_offline_and_transformers(client, lm, serve_model):
    r = client.completions.create(model="tiny-gpt2", prompt=PROMPTS, max_tokens=20, temperature=0)
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert texts == lm.generate(PROMPTS, max_new_tokens=20, temperature=0)
    assert texts == hf_greedy(serve_model, PROMPTS, 20)
    ids = [lm.generate_ids(p, max_new_tokens=20, temperature=0) for p in PROMPTS]
    assert r.usage.prompt_tokens == sum(len(lm.encode(p)) for p in PROMPTS)
    assert r.usage.completion_tokens == sum(map(len, ids))
    eot = lm.tokenizer.eot_id
    assert [c.finish_reason for c in r.choices] == ["stop" if i[-1] == eot else "length" for i in ids]
    # A single prompt given as token ids answers the same.
    one = client.completions.create(model="tiny-gpt2", prompt=lm.encode(PROMPTS[1]), max_tokens=20, temperature=0)
    assert one.choices[0].text == texts[1]


def test_streamed_completion_equals_whole(client):
    whole = client.completions.create(model="tiny-gpt2", prompt=PROMPTS[3], max_tokens=40, temperature=0)
    pieces = list(client.completions.create(model="tiny-gpt2", prompt=PROMPTS[3], max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(p.choices[0].text for p in pieces if p.choices) == whole.choices[0].text
    assert sum(1 for p in pieces if p.choices and p.choices[0].text) > 1  # really streamed in pieces
    assert [p.choices[0].finish_reason for p in pieces if p.choices][-1] == whole.choices[0].finish_reason
    assert pieces[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_sampled_choices_equal_offline_rows_with_the_seed(client, lm):
    kw = dict(max_new_tokens=25, temperature=0.9, top_k=20, top_p=0.95, seed=7)
    r = client.completions.create(model="tiny-gpt2", prompt=PROMPTS[0], max_tokens=25, n=3, temperature=0.9,
                                  top_p=0.95, seed=7, extra_body={"top_k": 20})
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    # Choice i draws with the key offline generate gives batch row i.
    assert texts == lm.generate([PROMPTS[0]] * 3, **kw)
    assert len(set(texts)) > 1
    streamed = {}
    for chunk in client.completions.create(model="tiny-gpt2", prompt=PROMPTS[0], max_tokens=25, n=3,
                                           temperature=0.9, top_p=0.95, seed=7, extra_body={"top_k": 20},
                                           stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == texts


def test_stop_strings_end_the_text_before_them(client, lm):
    greedy = lm.generate(PROMPTS[3], max_new_tokens=60, temperature=0)
    stop = greedy[8:10]  # a string the greedy text really contains
    cut = greedy[: greedy.index(stop)]
    for streaming in (False, True):
        r = client.completions.create(model="tiny-gpt2", prompt=PROMPTS[3], max_tokens=60, temperature=0,
                                      stop=[stop, "never-there"], stream=streaming)
        chunks = list(r) if streaming else [r]
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == cut
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def _logp(lm, ids):
    """log-softmax of the model at every position of `ids` (the model's own forward, fp32)."""
    logits, _ = model.forward(lm.generator.params, jnp.asarray([ids]), lm.generator.config)
    return np.asarray(jax.nn.log_softmax(logits[0, :, : lm.config.vocab_size]))


def test_logprobs_of_generated_tokens(client, lm):
    r = client.completions.create(model="tiny-gpt2", prompt=PROMPTS[1], max_tokens=8, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    prompt, gen = lm.encode(PROMPTS[1]), lm.generate_ids(PROMPTS[1], max_new_tokens=8, temperature=0, eos_ids=())
    ref = _logp(lm, prompt + gen)
    expected = [ref[len(prompt) - 1 + t, tok] for t, tok in enumerate(gen)]
    np.testing.assert_allclose(lp.token_logprobs, expected, atol=1e-4)
    assert lp.tokens == [lm.decode([t]) for t in gen]
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3 and max(top.values()) == pytest.approx(chosen, abs=1e-6)  # greedy = the best
    assert lp.text_offset == list(np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]))
    streamed = [c.choices[0].logprobs for c in client.completions.create(
        model="tiny-gpt2", prompt=PROMPTS[1], max_tokens=8, temperature=0, logprobs=3, stream=True,
        extra_body={"ignore_eos": True}) if c.choices and c.choices[0].logprobs]
    assert len(streamed) > 1  # they come with the chunks, not all at the end
    assert [x for s in streamed for x in s.token_logprobs] == lp.token_logprobs
    assert [x for s in streamed for x in s.text_offset] == lp.text_offset


def test_echo_scores_the_prompt_as_the_project_loss(client, lm):
    text = "To be, or not to be, that is the question"
    r = client.completions.create(model="tiny-gpt2", prompt=text, max_tokens=0, echo=True, logprobs=1,
                                  temperature=0)
    lp = r.choices[0].logprobs
    ids = lm.encode(text)
    assert r.choices[0].text == text and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.token_logprobs) == len(ids)
    nll, _ = loss_sums(lm.generator.params, {"tokens": jnp.asarray([ids]), "loss_mask": jnp.ones((1, len(ids) - 1))},
                       lm.generator.config)
    assert sum(lp.token_logprobs[1:]) == pytest.approx(-float(nll), abs=1e-4)
    ref = _logp(lm, ids)
    np.testing.assert_allclose(lp.token_logprobs[1:], ref[np.arange(len(ids) - 1), ids[1:]], atol=1e-5)
    assert r.usage.completion_tokens == 0


def test_chat_equals_offline_generate_of_the_rendered_template(client, lm, serve_model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say something."}]
    r = client.chat.completions.create(model="tiny-gpt2", messages=messages, max_tokens=30, temperature=0)
    prompt = chat.render(CHAT_TEMPLATE, messages, special_tokens={"eos_token": "<|endoftext|>"})
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == lm.generate(prompt, max_new_tokens=30, temperature=0)
    transformers = pytest.importorskip("transformers")
    hf_prompt = transformers.AutoTokenizer.from_pretrained(serve_model).apply_chat_template(
        messages, chat_template=CHAT_TEMPLATE, tokenize=False, add_generation_prompt=True)
    assert hf_prompt == prompt
    assert r.choices[0].message.content == hf_greedy(serve_model, [prompt], 30)[0]
    assert r.usage.prompt_tokens == len(lm.encode(prompt))

    chunks = list(client.chat.completions.create(model="tiny-gpt2", messages=messages, max_tokens=30,
                                                 temperature=0, stream=True, logprobs=True, top_logprobs=2))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    content = [t for c in chunks if c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    assert len(content) == r.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob == pytest.approx(t.top_logprobs[0].logprob) for t in content)


def test_sse_wire_format_ends_with_done(served):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "stream": True}
    with stream(served.url, "/v1/chat/completions", body) as (status, lines):
        assert status == 200
        lines = list(lines)
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert {json.loads(line[6:])["object"] for line in lines[:-1]} == {"chat.completion.chunk"}


BAD_COMPLETIONS = [
    (b"{not json", 400),
    (b"\xff\xfe\x00", 400),
    (b"[1, 2]", 400),
    ({"max_tokens": 3}, 400),  # no prompt
    ({"prompt": "a", "temperature": "hot"}, 400),
    ({"prompt": "a", "max_tokens": "5"}, 400),
    ({"prompt": 5}, 400),
    ({"prompt": "a", "stream": "yes"}, 400),
    ({"prompt": "a", "stop": 3}, 400),
    ({"prompt": "a", "max_tokens": 100000}, 400),  # beyond the context
    ({"prompt": "a" * 200, "max_tokens": 1}, 400),  # the prompt alone is beyond it
    ({"prompt": "a", "max_tokens": -1}, 400),
    ({"prompt": "a", "model": "gpt-4"}, 404),
    ({"prompt": ""}, 400),
    ({"prompt": []}, 400),
    ({"prompt": [5, 300]}, 400),  # a token id outside the vocabulary
    ({"prompt": "a", "n": 1000}, 400),
    ({"prompt": "a", "n": 0}, 400),
    ({"prompt": "a", "temperature": -1}, 400),
    ({"prompt": "a", "top_p": 0}, 400),
    ({"prompt": "a", "logprobs": 6}, 400),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400),
    ({"prompt": "a", "suffix": "z"}, 400),
    ({"prompt": "a", "presence_penalty": 1.0}, 400),
]
BAD_CHATS = [
    ({}, 400),  # no messages
    ({"messages": "hi"}, 400),
    ({"messages": []}, 400),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400),
    ({"messages": [{"role": "user", "content": 3}]}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 99, "logprobs": True}, 400),
]


def test_bad_requests_are_4xx_openai_errors_and_the_server_stays_up(served):
    cases = [("/v1/completions", b, s) for b, s in BAD_COMPLETIONS] + [("/v1/chat/completions", b, s)
                                                                       for b, s in BAD_CHATS]
    for path, body, status in cases:
        r = call(served.url, "POST", path, body)
        assert r.status == status, (path, body, r.body)
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["message"] and err["type"], (path, body, err)
    big = b'{"prompt": "' + b"a" * (5 << 20) + b'"}'
    assert call(served.url, "POST", "/v1/completions", big).status == 413
    assert call(served.url, "GET", "/v1/completions").status == 405
    assert call(served.url, "GET", "/v1/nothing").json()["error"]["type"] == "not_found_error"
    health = served.health()
    assert health["status"] == "ok" and health["busy_slots"] == 0 and health["open_requests"] == 0
    ok = call(served.url, "POST", "/v1/completions", {"prompt": "a", "max_tokens": 2})
    assert ok.status == 200 and ok.json()["usage"]["completion_tokens"] >= 1


def test_models_and_health(served):
    models = call(served.url, "GET", "/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["tiny-gpt2"] and models["object"] == "list"
    assert served.health()["slots"] == 16


def test_a_client_that_disconnects_mid_stream_frees_its_slot(served):
    budget = 16 * 124  # every slot, to the end of the context
    body = {"prompt": "Hello", "max_tokens": 124, "n": 16, "stream": True, "ignore_eos": True, "temperature": 0}
    before = served.health()["tokens"]
    with stream(served.url, "/v1/completions", body) as (status, lines):
        assert status == 200 and next(lines).startswith("data: ")
    # The connection is closed: the slots are freed and the request forgotten (bounded wait) ...
    health = served.wait_until(lambda h: h["busy_slots"] == 0 and h["open_requests"] == 0, timeout=30,
                               what="slots freed after disconnect")
    # ... because of the disconnect, not because the sequences ran out of budget.
    assert 0 < health["tokens"] - before < budget
    assert health["status"] == "ok"


# ------------------------------------------------------------------------------------------------ a one-slot server


@pytest.fixture(scope="module")
def small(serve_model, tmp_path_factory):
    """One slot, one waiting place, an API key, no chat template, compiled on first use."""
    d = tmp_path_factory.mktemp("small")
    server = ServerProcess(serve_model, "--max-batch", "1", "--max-queue", "1", "--chunk", "1", "--no-warmup",
                           "--grace", "120", log=d / "server.log", env={"AIGC_JAX_API_KEY": "sekrit"})
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop(signal.SIGKILL)


def _stream_in_thread(url, body, key, out: dict, name: str, started: threading.Event | None = None):
    def run():
        lines = []
        try:
            with stream(url, "/v1/completions", body, {"Authorization": f"Bearer {key}"}) as (status, it):
                out[name + "_status"] = status
                for line in it:
                    lines.append(line)
                    if started is not None:
                        started.set()
        finally:
            out[name] = lines

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _streamed_text(lines):
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    return "".join(e["choices"][0]["text"] for e in events if e["choices"]), events


def test_api_key_queue_limit_and_sigterm_drain(small, lm):
    url, auth = small.url, {"Authorization": "Bearer sekrit"}
    body = {"prompt": "a", "max_tokens": 2}
    assert call(url, "POST", "/v1/completions", body).status == 401
    wrong = call(url, "POST", "/v1/completions", body, {"Authorization": "Bearer nope"})
    assert wrong.status == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert call(url, "GET", "/health").status == 200  # health needs no key
    r = call(url, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, auth)
    assert r.status == 400 and "chat template" in r.json()["error"]["message"]

    # One running, one waiting: the third is turned away with 429 and Retry-After.
    out: dict = {}
    long = {"prompt": "Hello", "max_tokens": 100, "stream": True, "ignore_eos": True, "temperature": 0}
    started = threading.Event()
    a = _stream_in_thread(url, long, "sekrit", out, "a", started)
    assert started.wait(120)
    b = _stream_in_thread(url, long, "sekrit", out, "b")
    small.wait_until(lambda h: h["queued"] == 1, timeout=30, what="second request queued")
    full = call(url, "POST", "/v1/completions", body, auth)
    assert full.status == 429 and full.headers["retry-after"] == "1"
    assert full.json()["error"]["type"] == "rate_limit_error"

    # SIGTERM while one runs and one waits: both finish completely, then the process exits 0.
    assert small.stop(signal.SIGTERM, timeout=120) == 0
    a.join(60)
    b.join(60)
    expected = lm.generate("Hello", max_new_tokens=100, temperature=0, eos_ids=())
    for name in ("a", "b"):
        text, events = _streamed_text(out[name])
        assert out[name + "_status"] == 200 and out[name][-1] == "data: [DONE]"
        assert text == expected and events[-1]["choices"][0]["finish_reason"] == "length"
    with pytest.raises(OSError):
        call(url, "GET", "/health", timeout=5)


def test_cli_mistakes_are_one_line_errors(serve_model, tmp_path):
    import socket

    from conftest import assert_one_line_error, run_cli

    assert_one_line_error(run_cli("serve", "--model", serve_model, "--port", "70000"), "--port")
    assert_one_line_error(run_cli("serve", "--model", serve_model, "--max-batch", "0"), "--max-batch")
    assert_one_line_error(run_cli("serve", "--model", serve_model, "--chat-template", tmp_path / "none.jinja"),
                          "chat template")
    assert_one_line_error(run_cli("serve", "--model", tmp_path / "missing", "--port", "0"), "missing")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        assert_one_line_error(run_cli("serve", "--model", serve_model, "--port", port), "cannot listen", str(port))


def test_a_cold_start_listens_at_once_says_warming_and_queues_requests(serve_model, tmp_path, lm):
    """With an empty compile cache the server answers /health at once: 503 "warming" with the programs compiled so
    far, while a request sent meanwhile waits and is answered after the warm-up; then nothing compiles again."""
    server = ServerProcess(serve_model, "--max-batch", "1", "--max-prefill", "1", log=tmp_path / "server.log",
                           env={"AIGC_COMPILE_CACHE": "0"})
    try:
        deadline, warming = time.monotonic() + 240, None
        while warming is None and time.monotonic() < deadline:
            assert server.proc.poll() is None, server.output()
            try:
                r = call(server.url, "GET", "/health", timeout=5)
            except OSError:  # still importing or loading the model
                time.sleep(0.2)
                continue
            assert r.status == 503, r.json()  # never "ok" before it has compiled
            warming = r.json()
        assert warming["status"] == "warming" and warming["warmup"]["compiled"] < warming["warmup"]["programs"]
        out: dict = {}
        waiting = threading.Thread(target=lambda: out.update(r=call(
            server.url, "POST", "/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0},
            timeout=240)))
        waiting.start()
        ready = server.wait_ready(timeout=240)
        waiting.join(240)
        assert out["r"].status == 200
        assert out["r"].json()["choices"][0]["text"] == lm.generate(PROMPTS[0], max_new_tokens=8, temperature=0)
        assert ready["compiles"] == warming["warmup"]["programs"] == server.health()["compiles"]
        assert f"ready: {ready['compiles']} programs compiled in" in server.output()
    finally:
        server.stop(signal.SIGKILL)
