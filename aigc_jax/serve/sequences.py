"""What the serving engine takes and gives: a `Sequence` to generate with its `Sampling`, the events it reports
(`Tokens`, then one `Finished` with a reason; `Scored` for prompt log-probabilities) and the errors a submission can
meet. The HTTP side builds and reads these without knowing how the engine schedules them."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

from aigc_jax.errors import UserError

# Why a sequence ended: its EOS, its token budget, cancel() (or a stop string the caller found), engine shutdown.
STOP, LENGTH, CANCELLED, SHUTDOWN = "stop", "length", "cancelled", "shutdown"


class QueueFull(Exception):
    """More sequences are waiting for a slot than the engine's max_queue allows."""


class EngineClosed(Exception):
    """The engine is draining or stopped and takes no new work."""


class RequestError(UserError):
    """A prompt or token budget the model cannot serve; `param` names the request field at fault."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How one sequence picks tokens. temperature 0 = greedy; `row` is its choice index (n > 1): with the same seed,
    choice i draws what offline generate draws for batch row i."""

    temperature: float = 0.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    row: int = 0


@dataclasses.dataclass(frozen=True)
class Tokens:
    """New tokens of one sequence; with logprobs, each token's log-probability and its top alternatives."""

    ids: list[int]
    logprobs: list[float] | None = None
    top: list[list[tuple[int, float]]] | None = None


@dataclasses.dataclass(frozen=True)
class Finished:
    reason: str  # STOP, LENGTH, CANCELLED or SHUTDOWN


@dataclasses.dataclass(frozen=True)
class Scored:
    """Prompt log-probabilities: logprobs[j] scores token j+1; top[j] are the alternatives at position j."""

    logprobs: list[float]
    top: list[list[tuple[int, float]]]


class Sequence:
    """One sequence to generate. `emit(event)` is called from the engine thread with Tokens, then one Finished."""

    _ids = itertools.count()

    def __init__(self, prompt: list[int], max_tokens: int, emit: Callable, sampling: Sampling = Sampling(),
                 logprobs: bool = False, ignore_eos: bool = False):
        self.id = next(Sequence._ids)
        self.prompt, self.max_tokens, self.emit = list(prompt), int(max_tokens), emit
        self.sampling, self.logprobs, self.ignore_eos = sampling, logprobs, ignore_eos
        self.generated = 0
        self.cancelled = False  # set by cancel() from any thread; read by the engine at chunk boundaries
