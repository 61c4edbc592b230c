"""A bounded cache of jitted decode programs, shared by every Generator (generate.py) and serving engine
(serve/programs.py) in the process.

Programs take params and state as arguments, not constants, so loading the same model again (or another with the
same config) finds its executables here instead of compiling them again. The cache keeps the `max_size` most
recently used entries: a long-lived process that decodes many shapes or configs lets the oldest executables go
instead of holding every one it ever compiled. A caller that holds an entry keeps it alive after eviction.

Each entry counts the traces (= compilations) of its functions, which the tests that bound compiles read.
"""

from __future__ import annotations

import collections
import functools
import threading
from collections.abc import Callable, Hashable
from typing import Any

MAX_SIZE = 64


class Entry:
    """One cached value (typically a dict of jitted functions) and how often its functions were traced."""

    def __init__(self):
        self.value: Any = None
        self.traces = 0
        self._lock = threading.Lock()

    def counted(self, fn: Callable) -> Callable:
        """`fn`, counting its calls as traces of this entry: wrap it before jit, and a call is a trace."""

        @functools.wraps(fn)
        def traced(*args, **kwargs):
            with self._lock:  # the server's warm-up traces programs in parallel threads
                self.traces += 1
            return fn(*args, **kwargs)

        return traced


class Executables:
    """key -> Entry, least recently used dropped beyond `max_size` entries. Thread-safe."""

    def __init__(self, max_size: int = MAX_SIZE):
        if max_size < 1:
            raise ValueError(f"max_size must be >= 1, got {max_size}")
        self.max_size = max_size
        self._entries: collections.OrderedDict[Hashable, Entry] = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, build: Callable[[Entry], Any]) -> Entry:
        """The entry for `key`; on a miss `build(entry)` makes its value (jitting is lazy: nothing compiles here)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry
            entry = Entry()
            entry.value = build(entry)
            self._entries[key] = entry
            while len(self._entries) > self.max_size:
                self._entries.popitem(last=False)
            return entry

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries
