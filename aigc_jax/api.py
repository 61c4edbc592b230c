"""The notebook API: load a model, encode, generate, decode.

    import aigc_jax.api as aj
    lm = aj.load("path/to/gpt2")          # an HF GPT-2/Llama/Qwen2/Mistral dir, a model dir or training workdir
    ids = lm.encode("Once upon a time")
    print(lm.generate("Once upon a time", max_new_tokens=40, temperature=0))  # greedy; or top_k, top_p, num_beams
    print(lm.decode(lm.generate_ids(ids, max_new_tokens=40, temperature=0)))

`generate`/`generate_ids` take one prompt or a list (batched; left-padded on device) and the keyword arguments of
`aigc_jax.decode.GenerationConfig` (HF `generate`'s names). EOS defaults to the tokenizer's EOS ids
(`<|endoftext|>` for GPT-2; a Llama-family model's eos token and generation_config.json's list). The other
defaults come from the model's generation_config.json as HF reads it (`lm.generation_defaults`: e.g. Llama 3
Instruct samples at temperature 0.6, top_p 0.9, top_k 50); without one, decoding is greedy, as HF's default.
Explicit arguments override them; beam search (num_beams > 1) drops the model's sampling settings, and top_k/top_p/
min_p given without any temperature sample at temperature 1.
`stop_strings=["\n\n"]` ends each text before the first stop string (decoding stops there); with
`num_return_sequences=n` a prompt gets n consecutive results; `logprobs=True` returns (result, log-probabilities)
pairs: each generated token's log-probability under the model (its raw log-softmax, before temperature, penalty or
filtering, as the server's `logprobs`). `lm.complete(ids, gen)` returns `completions.Completion`s with all of it.
Sampling draws a fresh seed per call unless `seed=` is given; `lm.last_seed` is the seed the last call used, so
`lm.generate(prompt, temperature=0.8, seed=lm.last_seed)` reproduces a sample.
`lm.chat([{"role": "user", "content": "Hi"}], max_new_tokens=64)` renders the model's chat template as HF's
apply_chat_template does and returns the assistant's reply.
`aj.load(src, mesh="data=2,tensor=4")` decodes on a device mesh (weights and KV-cache heads split over tensor,
prompts over data x fsdp): the same ids as one device.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence

from aigc_jax import compile_cache, completions, configs, model, modeldir
from aigc_jax import tokenizers as tok
from aigc_jax.prompts import Prompter
from aigc_jax.decode import GenerationConfig, Generator
from aigc_jax.decode import mesh as decode_mesh
from aigc_jax.decode.config import as_int, from_hf
from aigc_jax.errors import UserError

RUNTIME_KEYS = configs.RUNTIME_KEYS  # how the weights run, not what they are: what `load(overrides=)` may change


class LM:
    """A model, its tokenizer (or None) and a compiled `Generator`."""

    def __init__(self, config: configs.ModelConfig, params, tokenizer: tok.Tokenizer | None, parallel: str = "none",
                 mesh=None):
        self.config, self.tokenizer = config, tokenizer
        self.prompts = Prompter(tokenizer) if tokenizer is not None else None  # text/chat → ids → text
        self.generator = Generator(config, params, mode=_decode_mode(parallel, mesh), mesh=mesh)
        self.last_seed: int | None = None  # the seed of the last generate/stream call (fresh unless given)

    @property
    def params(self):
        return self.generator.params

    def _prompts(self) -> Prompter:
        if self.prompts is None:
            raise UserError("this model has no tokenizer (no tokenizer.json/vocab.json beside it); use token ids")
        return self.prompts

    def use_chat_template(self, template: str) -> None:
        """Renders chats with `template` (Jinja, as HF's chat templates) instead of the model's own."""
        self.prompts = Prompter(self._prompts().tokenizer, chat_template=template)

    def encode(self, text: str) -> list[int]:
        """A prompt's ids as HF's `tokenizer(text)` gives them (with the BOS a Llama tokenizer adds)."""
        return self._prompts().encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._prompts().tokenizer.decode(ids)

    def continuation(self, prompt: Sequence[int], ids: Sequence[int], eos_ids: Sequence[int] = ()) -> str:
        """The text of generated `ids` (without a final EOS) read after `prompt`: a SentencePiece word keeps its
        leading space, as the server returns it."""
        return self._prompts().continuation(prompt, self.strip_eos(ids, eos_ids))

    @property
    def generation_defaults(self) -> dict:
        """The GenerationConfig fields the model's generation_config.json sets, read as HF reads it (see
        `decode.config.from_hf`); {} without one (greedy)."""
        return from_hf(self.tokenizer.generation) if self.tokenizer is not None else {}

    def config_for(self, **kwargs) -> GenerationConfig:
        """A GenerationConfig from HF-style keyword arguments over the model's defaults (`generation_defaults`),
        EOS defaulting to the tokenizer's EOS ids (its end-of-text and generation_config.json's list)."""
        if "eos_ids" not in kwargs and self.tokenizer is not None:
            kwargs["eos_ids"] = self.tokenizer.eos_ids
        known = [f.name for f in dataclasses.fields(GenerationConfig)]
        unknown = sorted(set(kwargs) - set(known))
        if unknown:
            hint = "greedy is temperature=0"
            raise UserError(f"generate: unknown argument {unknown[0]!r} ({hint}); known: {', '.join(known)}")
        gen = GenerationConfig(**{**self._defaults_under(kwargs), **kwargs})
        gen = gen.with_seed() if gen.is_sampling else gen
        self.last_seed = gen.seed if gen.is_sampling else None
        return gen

    def _defaults_under(self, kwargs: dict) -> dict:
        """The model's defaults as they combine with explicit `kwargs`."""
        defaults = self.generation_defaults
        sampling = ("temperature", "top_k", "top_p", "min_p")
        beams = as_int(kwargs.get("num_beams", 1))
        if isinstance(beams, int) and beams > 1:  # beam search here does not sample
            return {k: v for k, v in defaults.items() if k not in sampling}
        if "temperature" not in kwargs and "temperature" not in defaults and set(sampling) & set(kwargs):
            return {**defaults, "temperature": 1.0}  # asking for top_k/top_p/min_p is asking to sample
        return defaults

    def complete(self, prompts: Sequence[Sequence[int]], gen: GenerationConfig) -> list[completions.Completion]:
        """Every sequence `gen` asks for of token-id `prompts`: ids, text (with a tokenizer) and log-probabilities,
        cut at gen's stop strings (num_return_sequences consecutive sequences per prompt)."""
        if gen.stop_strings:
            self._prompts()  # stop strings are text: they need the tokenizer
        text_stream = (lambda prompt: self.prompts.text_stream(prompt, gen.stop_strings)) if self.prompts else None
        return completions.complete(self.generator, prompts, gen, text_stream)

    def _results(self, prompts, kwargs: dict, field: str):
        """`field` of each completion (with logprobs=True: (field, logprobs) pairs); one prompt and one sequence:
        that result alone."""
        gen = self.config_for(**kwargs)
        ids, single = self._batch(prompts)
        out = [getattr(c, field) if not gen.logprobs else (getattr(c, field), c.logprobs)
               for c in self.complete(ids, gen)]
        return out[0] if single and len(out) == 1 else out

    def _batch(self, prompts) -> tuple[list[list[int]], bool]:
        """(token-id prompts, whether one prompt was given) for a str, a list of ids, or a list of either."""
        if not isinstance(prompts, str) and not hasattr(prompts, "__len__"):
            prompts = list(prompts)  # a generator of prompts
        single = isinstance(prompts, str) or (len(prompts) > 0 and _is_token_id(prompts[0]))
        items = [prompts] if single else list(prompts)
        return [self.encode(p) if isinstance(p, str) else [as_int(t) for t in p] for p in items], single

    def generate_ids(self, prompts, **kwargs):
        """Generated ids (up to and including EOS, or the token that completed a stop string) for one prompt, or
        a list for a list of prompts or num_return_sequences > 1; (ids, logprobs) pairs with logprobs=True."""
        return self._results(prompts, kwargs, "ids")

    def generate(self, prompts, **kwargs):
        """The generated continuation text (without the EOS or stop string) for one prompt, or a list for a list of
        prompts or num_return_sequences > 1; (text, logprobs) pairs with logprobs=True."""
        self._prompts()
        return self._results(prompts, kwargs, "text")

    def chat_prompt(self, messages, tools=None, documents=None) -> list[int]:
        """The ids of `messages` rendered by the model's chat template with the assistant's turn opened (and
        `tools`/`documents` where the template uses them), as HF's apply_chat_template(messages,
        add_generation_prompt=True, tokenize=True) gives them (no special tokens added: the template writes them)."""
        return self._prompts().chat(messages, tools=tools, documents=documents)

    def chat(self, messages, tools=None, documents=None, **kwargs) -> str:
        """The assistant's reply to `messages` (OpenAI-style [{"role", "content"}, …]), generation stopping at any
        of the model's EOS ids; `kwargs` as for `generate` (e.g. max_new_tokens, temperature=0)."""
        return self.generate(self.chat_prompt(messages, tools, documents), **kwargs)

    def stream(self, prompt: str | Sequence[int], chunk: int = 16, **kwargs) -> Iterator[str]:
        """Yields the continuation of one prompt piece by piece, every `chunk` tokens; the pieces add up to what
        `generate` returns."""
        gen = self.config_for(**kwargs)
        batch, _ = self._batch(prompt)
        if len(batch) != 1:
            raise UserError(f"stream takes one prompt, got {len(batch)}: use generate for a list of prompts")
        if gen.num_return_sequences != 1:
            raise UserError("stream yields one sequence: drop num_return_sequences (or use generate)")
        text = self._prompts().text_stream(batch[0], gen.stop_strings)
        for (new,) in self.generator.stream(batch, gen, chunk):
            piece = text.add(self.strip_eos(new, gen.eos_ids))
            if piece:
                yield piece
            if text.stopped:  # leaving the loop stops decoding
                return
        piece = text.finish()
        if piece:
            yield piece

    @staticmethod
    def strip_eos(ids: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
        return list(ids[:-1]) if ids and ids[-1] in eos_ids else list(ids)


def _decode_mode(parallel: str, mesh) -> str:
    if mesh is not None and parallel != "none":
        raise UserError(f"--mesh splits the batch itself: drop --parallel {parallel}")
    return "mesh" if mesh is not None else parallel


def _is_token_id(x) -> bool:
    """An int of any kind (Python, NumPy, or a 0-d NumPy/JAX integer array): one id of a single prompt."""
    x = as_int(x)
    return isinstance(x, int) and not isinstance(x, bool)


def load(src: str, parallel: str = "none", overrides: dict | None = None, mesh=None, random_init: bool = False) -> LM:
    """An LM from a model dir, a training workdir or an HF GPT-2/Llama/Qwen2/Mistral dir. A preset name is an
    error unless `random_init=True` asks for its random weights (byte-level tokenizer when the vocabulary is 257:
    for smoke tests and timing). `overrides`: RUNTIME_KEYS only.
    `mesh`: "data=D,fsdp=F,tensor=T" (or a sharding.make_mesh Mesh) to decode on a device mesh; None: one device
    (or `parallel`'s data parallelism).
    Turns on JAX's persistent compilation cache (aigc_jax/compile_cache.py) so a new process reuses executables."""
    compile_cache.enable()
    check_source(src, random_init)
    if _decode_mode(parallel, mesh) == "mesh":
        mesh = decode_mesh.resolve(mesh)  # a bad --mesh is an error before the (slow) model load
    config, params, tokenizer = load_model(src, random_init)
    if overrides:
        runtime = configs.Runtime.of(config).with_overrides(configs.check_overrides(config, overrides))
        config = runtime.apply(config)
    return LM(config, params, tokenizer, parallel, mesh)


def check_source(src: str, random_init: bool = False) -> None:
    """A one-line error, before anything slow, for a preset without `random_init` or `random_init` without one."""
    if random_init and src not in configs.PRESETS:
        raise UserError(f"--random-init (random_init=True) takes a preset name, one of {', '.join(configs.PRESETS)}; "
                        f"got {src!r}")
    if not random_init and src in configs.PRESETS and not os.path.exists(src):
        raise configs.preset_is_not_weights(src, "ask for random weights on purpose with --random-init "
                                            "(aj.load(name, random_init=True))")


def load_model(src: str, random_init: bool = False):
    """(config, params, tokenizer or None) for anything `load` accepts."""
    check_source(src, random_init)
    if random_init:
        import jax

        config = configs.get_preset(src)
        tokenizer = tok.byte_level() if config.vocab_size == tok.byte_level().vocab_size else None
        return config, model.init_params(config, jax.random.key(0)), tokenizer
    return modeldir.load_any(src)
