"""Generated ids → what a caller gets back: each sequence's ids, text and log-probabilities, cut at stop strings.

Stop strings are matched on the decoded text by the server's `TextStream`, so offline generation ends a sequence
exactly where a `stop` request to the server would: the text ends before the stop string (as OpenAI's `stop`; HF's
`stop_strings` keeps it), and the ids end with the token that completed it. Greedy and sampled batches are decoded
in chunks and stop once every row has ended; beam search runs to its end and is cut afterwards (its best
hypothesis is only known then).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from aigc_jax.decode import GenerationConfig, Generator, trim
from aigc_jax.prompts import TextStream

# How often (in tokens) the host looks at the text for stop strings while the loop runs.
STOP_CHECK_EVERY = 16


@dataclasses.dataclass(frozen=True)
class Completion:
    prompt: int  # index of the prompt this sequence continues (num_return_sequences rows share one)
    ids: list[int]  # up to and including the EOS, or the token that completed a stop string
    text: str | None  # without the EOS and the stop string; None for a model without a tokenizer
    logprobs: list[float] | None  # each id's raw log-probability (the model's log-softmax), with gen.logprobs


def complete(generator: Generator, prompts: Sequence[Sequence[int]], gen: GenerationConfig,
             text_stream: Callable[[Sequence[int]], TextStream] | None) -> list[Completion]:
    """Every sequence `gen` asks for (prompt p's n = num_return_sequences sequences at rows p*n .. p*n+n-1).
    `text_stream(prompt ids)` makes the TextStream of a sequence continuing that prompt (holding gen's stop
    strings); None: no text (and no stop strings)."""
    n = gen.num_return_sequences
    rows = _Rows(lambda i: text_stream(prompts[i // n]), gen.eos_ids) if text_stream is not None else None
    until = rows.feed if rows is not None and gen.stop_strings else None
    out = generator.decode_padded(prompts, gen, until=until, chunk=STOP_CHECK_EVERY)
    results = []
    for i, padded in enumerate(out.tokens):
        ids, text = trim(padded, gen.eos_ids), None
        if rows is not None:
            ids, text = rows.finish(i, padded)
        logprobs = None if out.logprobs is None else [float(x) for x in out.logprobs[i, : len(ids)]]
        results.append(Completion(i // n, ids, text, logprobs))
    return results


class _Rows:
    """One TextStream per output row, fed the ids generated so far."""

    def __init__(self, text_stream: Callable[[int], TextStream], eos_ids: Sequence[int]):
        self.make, self.eos_ids = text_stream, eos_ids
        self.streams: dict[int, TextStream] = {}
        self.fed: dict[int, int] = {}
        self.ended: dict[int, bool] = {}

    def feed(self, tokens_RxT) -> bool:
        """Feeds each row its new ids; True once every row has ended (at an EOS or a stop string)."""
        for i, row in enumerate(tokens_RxT):
            self._feed(i, row)
        return all(self.ended.values())

    def _feed(self, i: int, padded) -> None:
        if self.ended.get(i):
            return
        if i not in self.streams:
            self.streams[i] = self.make(i)
        stream = self.streams[i]
        ids = trim(padded, self.eos_ids)
        eos = bool(ids) and ids[-1] in self.eos_ids
        stream.add(ids[self.fed.get(i, 0): len(ids) - eos])
        self.fed[i] = len(ids)
        self.ended[i] = eos or stream.stopped

    def finish(self, i: int, padded) -> tuple[list[int], str]:
        """(ids, text) of row i, all of whose tokens are `padded`."""
        self._feed(i, padded)
        stream = self.streams[i]
        if stream.stopped:
            return list(stream.ids), stream.text
        stream.finish()
        return trim(padded, self.eos_ids), stream.text
