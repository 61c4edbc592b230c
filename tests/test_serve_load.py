"""Load: 64 concurrent streaming clients (the official async `openai` client) × 4 requests of mixed prompt and
output lengths against one 16-slot server. Every stream must end complete and equal the offline greedy result of
its own prompt (none lost, none cross-wired), nothing may recompile, and afterwards the server's slots, queue,
open requests and memory must be back where they were."""

import asyncio

import numpy as np
import pytest

from aigc_jax import api

CLIENTS, ROUNDS = 64, 4
MAX_TOKENS = (1, 6, 17, 28)  # mixed output lengths (prompt + 28 - 1 <= the 128-token context)
ALPHABET = list("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,;:!?-'0123456789")


def workload(n: int, seed: int):
    rng = np.random.default_rng(seed)
    return [("".join(rng.choice(ALPHABET, int(rng.integers(1, 101)))), int(rng.choice(MAX_TOKENS)))
            for _ in range(n)]


def offline(lm, jobs):
    """Greedy (text, token count, finish reason) of each (prompt, max_tokens), batched by max_tokens."""
    out, eot = {}, lm.tokenizer.eot_id
    for m in MAX_TOKENS:
        prompts = [p for p, mt in jobs if mt == m]
        if prompts:
            for p, ids in zip(prompts, lm.generate_ids(prompts, max_new_tokens=m, temperature=0)):
                finish = "stop" if ids[-1] == eot else "length"
                out[(p, m)] = (lm.decode(lm.strip_eos(ids, (eot,))), len(ids), finish)
    return out


async def run_clients(url: str, jobs, clients: int):
    openai = pytest.importorskip("openai")
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    per_client = [jobs[i::clients] for i in range(clients)]

    async def one_client(mine):
        results = []
        for prompt, max_tokens in mine:  # a client sends its requests one after another
            stream = await client.completions.create(model="tiny-gpt2", prompt=prompt, max_tokens=max_tokens,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True})
            text, finish, usage = "", None, None
            async for chunk in stream:
                for c in chunk.choices:
                    text += c.text
                    finish = c.finish_reason or finish
                usage = chunk.usage or usage
            results.append(((prompt, max_tokens), text, usage.completion_tokens if usage else None, finish))
        return results

    try:
        done = await asyncio.wait_for(asyncio.gather(*(one_client(m) for m in per_client)), timeout=900)
    finally:
        await client.close()
    return [r for rs in done for r in rs]


def test_64_streaming_clients_x4_complete_uncrossed_and_back_to_baseline(served, serve_model):
    lm = api.load(str(serve_model))
    warm, jobs = workload(32, seed=1), workload(CLIENTS * ROUNDS, seed=2)
    expected = offline(lm, warm + jobs)

    asyncio.run(run_clients(served.url, warm, clients=16))  # first-time allocations (HTTP, pools) before the baseline
    baseline_rss = served.rss_bytes()
    before = served.wait_until(lambda h: h["busy_slots"] == 0 and h["open_requests"] == 0, what="idle")

    results = asyncio.run(run_clients(served.url, jobs, clients=CLIENTS))
    assert len(results) == len(jobs)
    assert sorted(key for key, *_ in results) == sorted(jobs)
    for key, *got in results:
        assert tuple(got) == expected[key], key

    after = served.wait_until(lambda h: h["busy_slots"] == 0 and h["queued"] == 0 and h["open_requests"] == 0,
                              timeout=30, what="slots and queue back to empty")
    assert after["compiles"] == before["compiles"] == served.ready["compiles"]  # nothing recompiled after warm-up
    assert after["tokens"] - before["tokens"] == sum(n for _, _, n, _ in results)
    assert after["status"] == "ok"
    growth = served.rss_bytes() - baseline_rss
    assert growth < 32 << 20, f"server RSS grew by {growth / 2**20:.1f} MiB over {len(jobs)} requests"
