"""Chat templates: a conversation rendered to prompt text exactly as HF's `apply_chat_template` renders it.

HF chat templates are Jinja programs shipped with a model (`chat_template.jinja`, or `chat_template` in
`tokenizer_config.json`). Rendering them the same way means the same environment: a sandbox with
`trim_blocks`/`lstrip_blocks` and loop controls, HF's `tojson` (no HTML escaping, `ensure_ascii=False`), and the
globals `raise_exception`, `strftime_now`, `namespace`; the variables are `messages`, `tools`, `documents`,
`add_generation_prompt` and the tokenizer's special tokens (`bos_token`, `eos_token`, …). Templates are untrusted
code from the Hub: the sandbox refuses attribute tricks, and template errors become one-line UserErrors.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.sandbox

from aigc_jax.errors import UserError

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
ROLES = ("system", "user", "assistant", "tool", "developer")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; HF's does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def compile_template(template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"the chat template does not parse (line {e.lineno}: {e.message})") from None


def check_messages(messages) -> list[dict]:
    """OpenAI-style messages: a non-empty list of {"role": one of ROLES, "content": str (or content parts)}."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise UserError('messages must be a non-empty list of {"role": ..., "content": ...} objects')
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise UserError(f"message {i} must be an object with 'role' and 'content', got {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise UserError(f"message {i} has role {role!r}; use one of {', '.join(ROLES)}")
        if not isinstance(content, (str, list)) and not (content is None and (m.get("tool_calls"))):
            raise UserError(f"message {i} needs a string 'content', got {type(content).__name__}")
        out.append(_plain(m))
    return out


def _plain(value):
    """JSON data only (what HF hands a template): no objects with methods the sandbox does not know."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    for base in (bool, str, int, float):  # subclasses (enums, numpy scalars) back to the base type
        if isinstance(value, base):
            return base(value) if base is not str else str.__str__(value)
    if hasattr(value, "item"):  # numpy scalars
        return _plain(value.item())
    return str(value)


def render(template: str, messages, *, add_generation_prompt: bool = True, tools=None, documents=None,
           special_tokens: Mapping[str, str] | None = None, **kwargs) -> str:
    """The prompt text for `messages`, as `tokenizer.apply_chat_template(messages, tokenize=False,
    add_generation_prompt=...)` gives it. `special_tokens`: the tokenizer's bos_token/eos_token/… strings."""
    messages = check_messages(messages)
    variables = {**(special_tokens or {}), **kwargs}
    try:
        return compile_template(template).render(
            messages=messages, tools=_plain(tools), documents=_plain(documents),
            add_generation_prompt=add_generation_prompt, **_plain(variables),
        )
    except jinja2.TemplateError as e:
        raise UserError(f"the chat template refused these messages: {e}") from None


def load_template(directory: str) -> str | None:
    """The chat template of an HF-style directory: chat_template.jinja, else tokenizer_config.json's chat_template
    (a string, or a list of named templates: "default"); None if it has none."""
    path = os.path.join(directory, TEMPLATE_FILE)
    if os.path.isfile(path):
        return read_template_file(path)
    config = os.path.join(directory, TOKENIZER_CONFIG)
    if not os.path.isfile(config):
        return None
    try:
        with open(config, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
    except (ValueError, OSError, AttributeError) as e:
        raise UserError(f"{config} is corrupt ({e})") from None
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise UserError(f"{config}: chat_template must be a string or a list of named templates")
    return template


def read_template_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read chat template {path}: {e}") from None


def save_template(directory: str, template: str) -> None:
    """Writes chat_template.jinja (transformers >= 4.43 reads it beside the tokenizer files)."""
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, TEMPLATE_FILE + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(template)
    os.replace(tmp, os.path.join(directory, TEMPLATE_FILE))
