"""One request's life, whatever its kind: its prompts turned into engine sequences (one per choice, prompts × n), the
engine's events into text through each choice's `TextStream`, the response as one JSON body or as server-sent events,
and cancellation of what still runs however the request ends (done, client gone, error), which frees its slots at the
next chunk boundary. The engine thread reports tokens through a callback that hands them to the request's asyncio
queue. Completions and chat (handlers.py) say only how their fields become prompts and their results responses.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from aigc_jax.errors import UserError
from aigc_jax.prompts import TextStream
from aigc_jax.serve import schemas as S
from aigc_jax.serve.checks import ApiError, check_range
from aigc_jax.serve.sequences import (CANCELLED, LENGTH, STOP, EngineClosed, Finished, QueueFull, RequestError,
                                      Sampling, Scored, Sequence, Tokens)
from aigc_jax.serve.server import Server


class Choice:
    """One choice of a response: its sequence in the engine and what it produced so far."""

    def __init__(self, index: int, prompt_index: int, prompt: list[int], stream: TextStream):
        self.index, self.prompt_index, self.prompt, self.text = index, prompt_index, prompt, stream
        self.seq: Sequence | None = None
        self.ids: list[int] = []  # generated ids, up to the EOS or the stop string
        self.logprobs: list[float] = []
        self.top: list[list[tuple[int, float]]] = []
        self.finish: str | None = None
        self.streamed = 0  # tokens whose logprobs were streamed

    def add(self, event: Tokens, eos: set[int]) -> str:
        """New text for `event`'s tokens (EOS is counted and scored but is not text)."""
        ids = list(event.ids)
        ends_on_eos = bool(ids) and ids[-1] in eos
        piece = self.text.add(ids[:-1] if ends_on_eos else ids)
        kept = len(self.text.ids) - len(self.ids) + (ends_on_eos and not self.text.stopped)
        self.ids += ids[:kept]
        if event.logprobs is not None:
            self.logprobs += event.logprobs[:kept]
            self.top += event.top[:kept]
        if self.text.stopped:
            self.finish = STOP
        return piece


class Request:
    """The shared life of a completions or chat request: submit, collect events, cancel on the way out."""

    def __init__(self, server: Server, request: HttpRequest, req):
        self.server, self.request, self.req = server, request, req
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.choices: list[Choice] = []
        self.scores: dict[int, Scored] = {}  # prompt index -> its echo log-probabilities
        self.queue: asyncio.Queue = asyncio.Queue()
        self._score_prompts: list[int] = []  # prompts whose echo log-probabilities are awaited
        self.gone = False  # the client disconnected
        self.closed = False
        self.seed: int | None = None  # the sampling seed, reported in the response (None when greedy)

    prefix = "cmpl"

    # -- building and submitting ----------------------------------------------------------------------------------

    def _emitter(self, key):
        loop = asyncio.get_running_loop()
        return lambda event: loop.call_soon_threadsafe(self.queue.put_nowait, (key, event))

    def _build(self, prompts: list[list[int]], max_tokens: int, sampling: Sampling, stop: list[str], n: int,
               logprobs: bool, prompt_param: str) -> None:
        engine = self.server.engine
        check_range(n, "n", 1, self.server.max_n, integer=True)
        if len(prompts) * n > engine.max_queue:
            raise ApiError(400, f"{len(prompts)} prompts x n={n} sequences are more than this server queues "
                           f"({engine.max_queue}): send fewer at a time", param="prompt")
        for p in prompts:
            try:
                engine.check(p, max_tokens)
            except RequestError as e:
                too_long = "context" in str(e)
                raise ApiError(400, str(e), param=prompt_param if e.param == "prompt" else e.param,
                               code="context_length_exceeded" if too_long else None) from None
        self.seed = sampling.seed if sampling.temperature > 0 else None
        for i, p in enumerate(prompts):
            for j in range(n):
                choice = Choice(len(self.choices), i, p, self.server.prompts.text_stream(p, stop))
                if max_tokens > 0:
                    # Row i*n + j: the request samples what offline `generate` samples for its prompts with each
                    # repeated n times (HF's num_return_sequences order), one key per choice.
                    s = Sampling(sampling.temperature, sampling.top_k, sampling.top_p, sampling.seed, row=i * n + j)
                    choice.seq = Sequence(p, max_tokens, self._emitter(("seq", choice.index)), s, logprobs,
                                          ignore_eos=self.req.ignore_eos)
                self.choices.append(choice)

    def _submit(self, score_prompts: list[int] = ()) -> None:
        engine, seqs = self.server.engine, [c.seq for c in self.choices if c.seq is not None]
        try:
            for i in score_prompts:
                engine.score(self.choices[i * self.req.n].prompt, self._emitter(("score", i)))
            engine.submit(seqs)
        except QueueFull as e:
            self._cancel()
            raise ApiError(429, f"the server is busy: {e}; retry shortly", code="rate_limit_exceeded",
                           kind="rate_limit_error", headers={"Retry-After": "1"}) from None
        except EngineClosed as e:
            self._cancel()
            raise ApiError(503, str(e), kind="server_error", code="unavailable") from None
        for c in self.choices:
            if c.seq is None:
                c.finish = LENGTH

    def _cancel(self) -> None:
        for c in self.choices:
            if c.seq is not None and c.finish is None:
                self.server.engine.cancel(c.seq)

    # -- events -----------------------------------------------------------------------------------------------

    def _pending(self) -> bool:
        wanted = set(self._score_prompts)
        return any(c.finish is None for c in self.choices) or not wanted <= set(self.scores)

    async def _events(self, poll_disconnect: bool) -> AsyncIterator[tuple[Choice | None, str]]:
        """(choice, new text) as events arrive; (None, "") after a score. Ends when every choice finished."""
        while self._pending():
            try:
                (kind, key), event = await asyncio.wait_for(self.queue.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if poll_disconnect and await self.request.is_disconnected():
                    self.gone = True
                    return
                continue
            if isinstance(event, Finished) and event.reason not in (STOP, LENGTH, CANCELLED):
                raise ApiError(503, "the server shut down before the request finished", kind="server_error")
            if kind == "score":
                self.scores[key] = event
                yield None, ""
                continue
            choice = self.choices[key]
            if choice.finish is not None:
                continue  # tokens after its stop string, or the engine confirming its cancellation
            if isinstance(event, Tokens):
                piece = choice.add(event, set() if self.req.ignore_eos else self.server.eos)
                if choice.text.stopped:
                    self.server.engine.cancel(choice.seq)
                yield choice, piece
            elif event.reason != CANCELLED:
                choice.finish = event.reason
                yield choice, choice.text.finish()

    async def respond(self):
        self.server.open_requests += 1
        streaming = False
        try:
            try:
                self._start()
            except UserError as e:  # e.g. text the tokenizer cannot encode
                raise ApiError(400, str(e)) from None
            if self.req.stream:
                streaming = True  # the response closes the books when it ends, however it ends
                return _Stream(self._sse(), self._close)
            async for _ in self._events(poll_disconnect=True):
                pass
        finally:
            if not streaming:
                self._close()
        if self.gone:
            return Response(status_code=499)  # nobody reads it: the client closed the connection
        return JSONResponse(self._final().model_dump())

    async def _sse(self):
        try:
            for chunk in self._stream_start():
                yield _sse(chunk)
            async for choice, piece in self._events(poll_disconnect=False):
                for chunk in self._stream_chunks(choice, piece):
                    yield _sse(chunk)
            opts = self.req.stream_options
            if opts is not None and opts.include_usage:
                yield _sse(self._usage_chunk())
            yield "data: [DONE]\n\n"
        except ApiError as e:
            body = S.ErrorResponse(error=S.ErrorDetail(message=e.message, type=e.kind, code=e.code))
            yield _sse(body)
        finally:
            self._close()

    def _close(self) -> None:
        """Cancels what still runs and stops counting the request (once, on whichever way out comes first)."""
        if not self.closed:
            self.closed = True
            self._cancel()
            self.server.open_requests -= 1

    def _usage(self) -> S.Usage:
        prompt = sum(len(self.choices[i * self.req.n].prompt) for i in range(len(self.choices) // self.req.n))
        completion = sum(len(c.ids) for c in self.choices)
        return S.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    def _top_pairs(self, pairs, k: int) -> list[tuple[str, float, int]]:
        return [(self.server.token_text.string(t), lp, t) for t, lp in pairs[:k]]


class _Stream(StreamingResponse):
    """Server-sent events that call `on_close` when the response ends, also when the client left before the
    body started (the body's own `finally` never runs then)."""

    def __init__(self, body, on_close):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _sse(model) -> str:
    return f"data: {model.model_dump_json()}\n\n"
