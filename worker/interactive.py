"""The worker's warm probes: a trained SAE and its model kept loaded between interactive requests.

``warm_probe(key, load)`` returns the ``Entry`` for ``key`` — (training id, checkpoint path,
checkpoint file mtime), so a newer checkpoint of the same training loads afresh — calling
``load()`` (which builds an ``engine.probe.Probe``) only when it is not loaded. Use the probe
under its entry's lock (``with entry.lock:``): a probe is not safe for two calls at once (steering
hooks the model) and the consumer runs several worker threads.

An entry stays loaded ``keep_s()`` seconds after its last use (``SAE_STUDIO_PROBE_KEEP_S``,
default 300), at most ``MAX_ENTRIES`` at a time (the least recently used goes first); a daemon
thread releases expired entries even when no request comes, so an idle worker gives the memory
back (on CUDA also the allocator's cache). Loading happens under one lock, so two requests for
the same cold SAE load it once.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

MAX_ENTRIES = 2
"""Probes kept loaded at once."""
KEEP_S = 300.0
"""Default seconds a probe stays loaded after its last use."""
SWEEP_S = 5.0
"""Seconds between the release thread's looks for expired entries."""

Key = tuple[Any, ...]


def keep_s() -> float:
    """``$SAE_STUDIO_PROBE_KEEP_S`` (seconds, >= 0) or ``KEEP_S``; read on every call."""
    raw = os.environ.get("SAE_STUDIO_PROBE_KEEP_S", "")
    try:
        value = float(raw)
    except ValueError:
        return KEEP_S
    return value if value >= 0 else KEEP_S


@dataclass
class Entry:
    """A loaded probe; use ``value`` while holding ``lock``."""

    key: Key
    value: Any
    lock: threading.Lock = field(default_factory=threading.Lock)
    used_at: float = field(default_factory=time.monotonic)
    loaded_in_s: float = 0.0


class WarmCache:
    """Loaded probes by key, released after ``keep()`` idle seconds; thread-safe."""

    def __init__(self, max_entries: int = MAX_ENTRIES,
                 keep: Callable[[], float] = keep_s) -> None:
        self.max_entries, self.keep = max_entries, keep
        self._entries: OrderedDict[Key, Entry] = OrderedDict()
        self._lock = threading.Lock()  # guards _entries
        self._load_lock = threading.Lock()  # one load at a time
        self._sweeper: threading.Thread | None = None

    def get(self, key: Key, load: Callable[[], Any]) -> tuple[Entry, bool]:
        """The entry for ``key`` and whether it was already loaded (warm); loads it with
        ``load()`` otherwise, releasing expired and least recently used entries first."""
        self.release_expired()
        found = self._touch(key)
        if found is not None:
            return found, True
        with self._load_lock:
            found = self._touch(key)  # loaded by another thread meanwhile
            if found is not None:
                return found, True
            self._make_room(self.max_entries - 1)
            t0 = time.perf_counter()
            entry = Entry(key, load())
            entry.loaded_in_s = time.perf_counter() - t0
            with self._lock:
                self._entries[key] = entry
            self._start_sweeper()
            return entry, False

    def _touch(self, key: Key) -> Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                entry.used_at = time.monotonic()
                self._entries.move_to_end(key)
            return entry

    def done(self, entry: Entry) -> None:
        """Mark ``entry`` used now (call after the work, so its idle time starts then)."""
        entry.used_at = time.monotonic()

    def keys(self) -> list[Key]:
        with self._lock:
            return list(self._entries)

    def _drop(self, keys: list[Key]) -> int:
        """Remove these entries (waiting for any use in progress to end) and free memory."""
        dropped = []
        with self._lock:
            for key in keys:
                entry = self._entries.pop(key, None)
                if entry is not None:
                    dropped.append(entry)
        for entry in dropped:
            with entry.lock:  # never pull a probe from under a request using it
                entry.value = None
        if dropped:
            _free_memory()
        return len(dropped)

    def _make_room(self, keep_n: int) -> None:
        with self._lock:
            extra = list(self._entries)[:max(0, len(self._entries) - keep_n)]
        self._drop(extra)

    def release_expired(self) -> int:
        """Release entries idle for longer than ``keep()`` seconds; returns how many."""
        limit = self.keep()
        now = time.monotonic()
        with self._lock:
            old = [k for k, e in self._entries.items()
                   if now - e.used_at > limit and not e.lock.locked()]
        return self._drop(old)

    def clear(self) -> int:
        """Release every entry; returns how many."""
        return self._drop(self.keys())

    def _start_sweeper(self) -> None:
        with self._lock:
            if self._sweeper is not None and self._sweeper.is_alive():
                return
            self._sweeper = threading.Thread(target=self._sweep, name="sae-probe-release",
                                             daemon=True)
            self._sweeper.start()

    def _sweep(self) -> None:
        while True:
            time.sleep(min(SWEEP_S, max(0.05, self.keep() / 2)))
            self.release_expired()
            with self._lock:
                if not self._entries:
                    self._sweeper = None
                    return


def _free_memory() -> None:
    gc.collect()
    try:
        import torch
    except ImportError:  # pragma: no cover - the worker always has torch
        return
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


CACHE = WarmCache()
"""The worker process's probes."""


def warm_probe(key: Key, load: Callable[[], Any]) -> tuple[Entry, bool]:
    """``CACHE.get(key, load)``."""
    return CACHE.get(key, load)
