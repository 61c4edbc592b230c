"""One request's life: completions and chat requests turned into engine sequences, their events into OpenAI
responses (a JSON body, or server-sent events as they come), and the checks on their fields.

Each request becomes one engine `Sequence` per choice (prompts × n); the engine thread reports tokens through a
callback that hands them to the request's asyncio queue. Whatever way a request ends (done, client gone, error),
its sequences that still run are cancelled, which frees their slots at the next chunk boundary.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from aigc_jax.errors import UserError
from aigc_jax.prompts import TextStream
from aigc_jax.serve import schemas as S
from aigc_jax.serve.engine import (CANCELLED, LENGTH, STOP, EngineClosed, Finished, QueueFull, RequestError, Sampling,
                                   Scored, Sequence, Tokens)
from aigc_jax.serve.programs import TOP_LOGPROBS
from aigc_jax.serve.server import Server



MAX_STOP = 4  # OpenAI's limit on stop sequences
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class ApiError(Exception):
    """A request the server refuses: becomes an OpenAI-shaped error response with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers


def _check_range(value, name: str, low=None, high=None, integer=False) -> None:
    bad = (isinstance(value, float) and not math.isfinite(value)) or (low is not None and value < low) or (
        high is not None and value > high)
    if bad:
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ApiError(400, f"{name} must be {'an integer ' if integer else ''}{bounds}, got {value!r}", param=name)


def _sampling(req) -> Sampling:
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    top_k = 0 if req.top_k in (None, -1) else req.top_k
    _check_range(temperature, "temperature", 0.0, 2.0)
    if not (0 < top_p <= 1) or not math.isfinite(top_p):
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p!r}", param="top_p")
    _check_range(top_k, "top_k", 0, integer=True)
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise ApiError(400, f"{name} is not supported (only 0)", param=name)
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported", param="logit_bias")
    # A request without a seed draws a fresh one (reported in the response), as offline `generate` does.
    seed = req.seed if req.seed is not None else secrets.randbits(31)
    return Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)


def _stops(req) -> list[str]:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise ApiError(400, f"stop takes at most {MAX_STOP} strings, got {len(stop)}", param="stop")
    return stop


# ------------------------------------------------------------------------------------------------ one request


class _Choice:
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


class _Request:
    """The shared life of a completions or chat request: submit, collect events, cancel on the way out."""

    def __init__(self, server: Server, request: Request, req):
        self.server, self.request, self.req = server, request, req
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.choices: list[_Choice] = []
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
        _check_range(n, "n", 1, self.server.max_n, integer=True)
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
                choice = _Choice(len(self.choices), i, p, self.server.prompts.text_stream(p, stop))
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

    async def _events(self, poll_disconnect: bool) -> AsyncIterator[tuple[_Choice | None, str]]:
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


class Completions(_Request):
    prefix = "cmpl"

    def _start(self) -> None:
        req = self.req
        if req.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if req.best_of not in (None, req.n):
            raise ApiError(400, "best_of is not supported (only best_of = n)", param="best_of")
        max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        _check_range(max_tokens, "max_tokens", 0, integer=True)
        if req.logprobs is not None:
            _check_range(req.logprobs, "logprobs", 0, TOP_LOGPROBS, integer=True)
            if req.echo and req.stream:
                raise ApiError(400, "echo with logprobs is not supported when streaming", param="stream")
        prompts = self._prompts(req.prompt)
        self._build(prompts, max_tokens, _sampling(req), _stops(req), req.n, req.logprobs is not None, "prompt")
        self._score_prompts = list(range(len(prompts))) if req.echo and req.logprobs is not None else []
        self._submit(self._score_prompts)

    def _prompts(self, prompt) -> list[list[int]]:
        """Text is encoded as offline `generate` encodes it (with the BOS a Llama tokenizer adds); token ids are
        taken as they are. `self.texts` keeps each text prompt for `echo`."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], str)):
            texts = [prompt] if isinstance(prompt, str) else prompt
            if any(t == "" for t in texts):
                raise ApiError(400, "the prompt is empty: give at least one character of text", param="prompt")
            self.texts = list(texts)
            return self.server.prompts.encode_batch(texts)
        if not prompt:
            raise ApiError(400, "the prompt is empty: give text or token ids", param="prompt")
        return [prompt] if isinstance(prompt[0], int) else [list(p) for p in prompt]

    def _logprobs(self, c: _Choice, start: int = 0) -> S.CompletionLogprobs | None:
        """The choice's logprobs (with echo: the prompt's first), from entry `start` on."""
        if self.req.logprobs is None:
            return None
        k, tt = self.req.logprobs, self.server.token_text
        ids, lps, tops = list(c.ids), list(c.logprobs), list(c.top)
        if self.req.echo:
            scored = self.scores[c.prompt_index]
            ids = c.prompt + ids
            lps = [None] + scored.logprobs + lps
            tops = [None] + scored.top[: len(c.prompt) - 1] + tops
        strings, offsets = tt.strings_and_offsets(ids)
        top_dicts = []
        for pairs in tops:
            if pairs is None:
                top_dicts.append(None)
                continue
            d = {}
            for s, lp, _ in self._top_pairs(pairs, k):
                d.setdefault(s, lp)  # distinct ids may share a string; keep the likelier
            top_dicts.append(d)
        # start > 0 only when streaming, where echo with logprobs is refused: entries are generated tokens.
        return S.CompletionLogprobs(tokens=strings[start:], token_logprobs=lps[start:], top_logprobs=top_dicts[start:],
                                    text_offset=offsets[start:])

    texts: list[str] | None = None  # the text prompts, as given

    def _prefix_text(self, c: _Choice) -> str:
        if not self.req.echo:
            return ""
        return self.texts[c.prompt_index] if self.texts is not None else self.server.tokenizer.decode(c.prompt)

    def _final(self) -> S.Completion:
        choices = [S.CompletionChoice(index=c.index, text=self._prefix_text(c) + c.text.text,
                                      logprobs=self._logprobs(c), finish_reason=c.finish) for c in self.choices]
        return S.Completion(id=self.id, created=self.created, model=self.server.model_name, choices=choices,
                            usage=self._usage(), seed=self.seed)

    def _chunk(self, choices) -> S.Completion:
        return S.Completion(id=self.id, created=self.created, model=self.server.model_name, choices=choices,
                            seed=self.seed)

    def _stream_start(self):
        if self.req.echo:
            for c in self.choices:
                yield self._chunk([S.CompletionChoice(index=c.index, text=self._prefix_text(c))])

    def _stream_chunks(self, c: _Choice | None, piece: str):
        if c is None:
            return
        done = c.finish is not None
        lp = None
        if self.req.logprobs is not None and len(c.ids) > c.streamed:  # the logprobs of this chunk's tokens
            lp, c.streamed = self._logprobs(c, c.streamed), len(c.ids)
        if piece or done or lp is not None:
            yield self._chunk([S.CompletionChoice(index=c.index, text=piece, logprobs=lp,
                                                  finish_reason=c.finish if done else None)])

    def _usage_chunk(self):
        return S.Completion(id=self.id, created=self.created, model=self.server.model_name, choices=[],
                            usage=self._usage(), seed=self.seed)


_TEMPLATE_RESERVED = {"messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token",
                      "unk_token", "pad_token"}


def _refuse_unhonoured_chat_fields(req) -> None:
    """Fields that would change what the reply must be but that this server cannot honour are a 400, never
    ignored: a forced tool call, a JSON mode, OpenAI's deprecated `functions`."""
    if req.functions is not None or req.function_call is not None:
        param = "functions" if req.functions is not None else "function_call"
        raise ApiError(400, f"{param} is not supported: pass the functions as `tools`, which the chat template "
                       "renders", param=param)
    if req.tool_choice not in (None, "auto", "none"):
        raise ApiError(400, "tool_choice can only be 'auto' or 'none': forcing a tool call is not supported",
                       param="tool_choice")
    if req.response_format is not None and req.response_format.get("type") != "text":
        raise ApiError(400, "response_format can only be {'type': 'text'}: JSON modes are not supported",
                       param="response_format")
    clash = sorted(_TEMPLATE_RESERVED & set(req.chat_template_kwargs or {}))
    if clash:
        raise ApiError(400, f"chat_template_kwargs cannot set {', '.join(clash)}: give those as request fields",
                       param="chat_template_kwargs")


class ChatCompletions(_Request):
    prefix = "chatcmpl"

    def _start(self) -> None:
        req, server = self.req, self.server
        if server.prompts.chat_template is None:
            raise ApiError(400, f"the model {server.model_name!r} has no chat template: use /v1/completions, or "
                           "start the server with --chat-template FILE", param="messages", code="no_chat_template")
        _refuse_unhonoured_chat_fields(req)
        try:
            prompt = server.prompts.chat(req.messages, tools=req.tools, documents=req.documents,
                                         **(req.chat_template_kwargs or {}))
        except UserError as e:
            raise ApiError(400, str(e), param="messages") from None
        if not prompt:
            raise ApiError(400, "the messages render to an empty prompt", param="messages")
        limit = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        ctx = server.engine.config.n_positions
        max_tokens = max(ctx - len(prompt) + 1, 1) if limit is None else limit
        _check_range(max_tokens, "max_tokens", 1, integer=True)
        if req.top_logprobs is not None:
            _check_range(req.top_logprobs, "top_logprobs", 0, TOP_LOGPROBS, integer=True)
        self._build([prompt], max_tokens, _sampling(req), _stops(req), req.n, req.logprobs, "messages")
        self._submit()

    def _logprobs(self, c: _Choice, start: int = 0) -> S.ChoiceLogprobs | None:
        if not self.req.logprobs:
            return None
        tt, k = self.server.token_text, self.req.top_logprobs or 0
        content = []
        for t, lp, pairs in zip(c.ids[start:], c.logprobs[start:], c.top[start:]):
            top = [S.TopLogprob(token=s, logprob=v, bytes=list(tt.bytes(i))) for s, v, i in self._top_pairs(pairs, k)]
            content.append(S.TokenLogprob(token=tt.string(t), logprob=lp, bytes=list(tt.bytes(t)), top_logprobs=top))
        return S.ChoiceLogprobs(content=content)

    def _final(self) -> S.ChatCompletion:
        choices = [S.ChatChoice(index=c.index, message=S.ChatMessage(content=c.text.text),
                                logprobs=self._logprobs(c), finish_reason=c.finish) for c in self.choices]
        return S.ChatCompletion(id=self.id, created=self.created, model=self.server.model_name, choices=choices,
                                usage=self._usage(), seed=self.seed)

    def _chunk(self, choices, usage=None) -> S.ChatCompletionChunk:
        return S.ChatCompletionChunk(id=self.id, created=self.created, model=self.server.model_name,
                                     choices=choices, usage=usage, seed=self.seed)

    def _stream_start(self):
        for c in self.choices:
            yield self._chunk([S.ChunkChoice(index=c.index, delta=S.Delta(role="assistant", content=""))])

    def _stream_chunks(self, c: _Choice | None, piece: str):
        if c is None:
            return
        done = c.finish is not None
        lp = None
        if self.req.logprobs and len(c.ids) > c.streamed:
            lp, c.streamed = self._logprobs(c, c.streamed), len(c.ids)
        if piece or lp is not None:
            yield self._chunk([S.ChunkChoice(index=c.index, delta=S.Delta(content=piece), logprobs=lp)])
        if done:
            yield self._chunk([S.ChunkChoice(index=c.index, delta=S.Delta(), finish_reason=c.finish)])

    def _usage_chunk(self):
        return self._chunk([], usage=self._usage())
