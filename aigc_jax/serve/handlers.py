"""The two OpenAI endpoints as requests (request.py): /v1/completions (text or token-id prompts, echo, logprobs with
the likeliest alternatives) and /v1/chat/completions (messages rendered by the model's chat template, with tools and
documents): how their fields become prompts, and their results OpenAI responses and chunks.
"""

from __future__ import annotations

from aigc_jax.errors import UserError
from aigc_jax.serve import schemas as S
from aigc_jax.serve.checks import (DEFAULT_MAX_TOKENS, ApiError, check_range, refuse_unhonoured_chat_fields, sampling,
                                   stops)
from aigc_jax.serve.programs import TOP_LOGPROBS
from aigc_jax.serve.request import Choice, Request



class Completions(Request):
    prefix = "cmpl"

    def _start(self) -> None:
        req = self.req
        if req.suffix:
            raise ApiError(400, "suffix is not supported", param="suffix")
        if req.best_of not in (None, req.n):
            raise ApiError(400, "best_of is not supported (only best_of = n)", param="best_of")
        max_tokens = DEFAULT_MAX_TOKENS if req.max_tokens is None else req.max_tokens
        check_range(max_tokens, "max_tokens", 0, integer=True)
        if req.logprobs is not None:
            check_range(req.logprobs, "logprobs", 0, TOP_LOGPROBS, integer=True)
            if req.echo and req.stream:
                raise ApiError(400, "echo with logprobs is not supported when streaming", param="stream")
        prompts = self._prompts(req.prompt)
        self._build(prompts, max_tokens, sampling(req), stops(req), req.n, req.logprobs is not None, "prompt")
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

    def _logprobs(self, c: Choice, start: int = 0) -> S.CompletionLogprobs | None:
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

    def _prefix_text(self, c: Choice) -> str:
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

    def _stream_chunks(self, c: Choice | None, piece: str):
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


class ChatCompletions(Request):
    prefix = "chatcmpl"

    def _start(self) -> None:
        req, server = self.req, self.server
        if server.prompts.chat_template is None:
            raise ApiError(400, f"the model {server.model_name!r} has no chat template: use /v1/completions, or "
                           "start the server with --chat-template FILE", param="messages", code="no_chat_template")
        refuse_unhonoured_chat_fields(req)
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
        check_range(max_tokens, "max_tokens", 1, integer=True)
        if req.top_logprobs is not None:
            check_range(req.top_logprobs, "top_logprobs", 0, TOP_LOGPROBS, integer=True)
        self._build([prompt], max_tokens, sampling(req), stops(req), req.n, req.logprobs, "messages")
        self._submit()

    def _logprobs(self, c: Choice, start: int = 0) -> S.ChoiceLogprobs | None:
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

    def _stream_chunks(self, c: Choice | None, piece: str):
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
