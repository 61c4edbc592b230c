"""The checks on an OpenAI request's fields that need no engine: ranges, sampling settings, stop strings, and the
chat fields this server cannot honour. Each failure is an `ApiError`, which the app turns into a 4xx JSON error."""

from __future__ import annotations

import math
import secrets

from aigc_jax.serve.sequences import Sampling

MAX_STOP = 4  # OpenAI's limit on stop sequences
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


class ApiError(Exception):
    """A request the server refuses: becomes an OpenAI-shaped error response with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers


def check_range(value, name: str, low=None, high=None, integer=False) -> None:
    bad = (isinstance(value, float) and not math.isfinite(value)) or (low is not None and value < low) or (
        high is not None and value > high)
    if bad:
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ApiError(400, f"{name} must be {'an integer ' if integer else ''}{bounds}, got {value!r}", param=name)


def sampling(req) -> Sampling:
    temperature = 1.0 if req.temperature is None else req.temperature
    top_p = 1.0 if req.top_p is None else req.top_p
    top_k = 0 if req.top_k in (None, -1) else req.top_k
    check_range(temperature, "temperature", 0.0, 2.0)
    if not (0 < top_p <= 1) or not math.isfinite(top_p):
        raise ApiError(400, f"top_p must be in (0, 1], got {top_p!r}", param="top_p")
    check_range(top_k, "top_k", 0, integer=True)
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise ApiError(400, f"{name} is not supported (only 0)", param=name)
    if req.logit_bias:
        raise ApiError(400, "logit_bias is not supported", param="logit_bias")
    # A request without a seed draws a fresh one (reported in the response), as offline `generate` does.
    seed = req.seed if req.seed is not None else secrets.randbits(31)
    return Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)


def stops(req) -> list[str]:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise ApiError(400, f"stop takes at most {MAX_STOP} strings, got {len(stop)}", param="stop")
    return stop


TEMPLATE_RESERVED = {"messages", "tools", "documents", "add_generation_prompt", "bos_token", "eos_token",
                      "unk_token", "pad_token"}


def refuse_unhonoured_chat_fields(req) -> None:
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
    clash = sorted(TEMPLATE_RESERVED & set(req.chat_template_kwargs or {}))
    if clash:
        raise ApiError(400, f"chat_template_kwargs cannot set {', '.join(clash)}: give those as request fields",
                       param="chat_template_kwargs")
