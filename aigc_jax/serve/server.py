"""What every request handler shares: the engine, the prompt path, the served model's name and the request limits.
(Its own module so that the app, which routes requests, and the handlers, which serve them, both depend on it
and not on each other.)"""

from __future__ import annotations

import time

from aigc_jax.serve.text import TokenText


class Server:
    """What the handlers share: the engine, the prompt path (tokenizer and chat template: aigc_jax/prompts.py, the
    same as offline generation's), the served model's name and the request limits."""

    def __init__(self, engine, prompts, model_name: str, *, api_key: str | None = None,
                 max_body_bytes: int = 4 << 20, max_n: int | None = None, aliases: tuple[str, ...] = ()):
        self.engine, self.prompts, self.tokenizer, self.model_name = engine, prompts, prompts.tokenizer, model_name
        self.names = {model_name, *aliases}
        self.api_key, self.max_body_bytes = api_key, max_body_bytes
        self.max_n = max_n or engine.max_batch
        self.token_text = TokenText(prompts.tokenizer)
        self.eos = set(engine.eos_ids.tolist())
        self.created = int(time.time())
        self.open_requests = 0  # completions/chat requests between parsing and their last byte (or cancellation)
