"""A byte-budgeted LRU cache of resident values (adapters) with pinning and single-flight loads.

One short global lock guards the bookkeeping; `load`, `on_load` and `on_evict` run outside it, so
a slow load of one key never delays other keys. Concurrent misses of a key share one Future: load
runs once and waiters get its value or exception; failed or too-large loads are not cached. A
value that cannot fit (alone, or beside pinned entries) raises before anything is evicted.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from ..errors import SpeftError

V = TypeVar("V")


class AdapterTooLargeError(SpeftError):
    """A value does not fit the cache budget, alone or beside the pinned entries."""

    code = "adapter_too_large"


@dataclass(frozen=True)
class CacheEntryInfo:
    """A snapshot of one resident entry."""

    key: str
    nbytes: int
    pinned: bool
    hits: int
    loaded_at: float
    last_used: float
    load_seconds: float


@dataclass
class CacheStats:
    """Counters since the cache was created; evictions count budget, evict() and clear()."""

    hits: int = 0
    misses: int = 0
    loads: int = 0
    load_failures: int = 0
    evictions: int = 0
    load_seconds_total: float = 0.0


@dataclass(slots=True)
class _Entry(Generic[V]):
    value: V
    nbytes: int
    pinned: bool
    loaded_at: float
    last_used: float
    load_seconds: float
    hits: int = 0


class ByteBudgetCache(Generic[V]):
    """Resident values by key, bounded in bytes: LRU eviction, pinning, single-flight loads."""

    def __init__(
        self,
        budget_bytes: int,
        *,
        size_of: Callable[[V], int],
        on_evict: Callable[[str, V], None] | None = None,
        on_load: Callable[[str, float], None] | None = None,
    ) -> None:
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be a positive int, got {budget_bytes!r}")
        self._budget = budget_bytes
        self._size_of = size_of
        self._on_evict = on_evict
        self._on_load = on_load
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _Entry[V]] = OrderedDict()  # least recently used first
        self._inflight: dict[str, Future[V]] = {}
        self._resident = 0
        self._stats = CacheStats()

    def get_or_load(self, key: str, load: Callable[[], V], *, pin: bool = False) -> V:
        """Return the resident value for `key`, else load it once (shared by concurrent callers)."""
        with self._lock:
            entry = self._hit_locked(key)
            if entry is not None:
                entry.pinned = entry.pinned or pin
                return entry.value
            self._stats.misses += 1
            future = self._inflight.get(key)
            owner = future is None
            if future is None:
                future = self._inflight[key] = Future()
        if not owner:
            value = future.result()
            if pin:
                with self._lock:
                    if key in self._entries:
                        self._entries[key].pinned = True
            return value
        try:
            value, evicted = self._load_and_insert(key, load, pin)
        except BaseException as exc:
            with self._lock:
                if self._inflight.get(key) is future:
                    del self._inflight[key]
            future.set_exception(exc)
            raise
        future.set_result(value)
        self._notify_evicted(evicted)
        return value

    def get(self, key: str) -> V | None:
        """Return the resident value (a hit, moved to most recent), else None uncounted."""
        with self._lock:
            entry = self._hit_locked(key)
            return None if entry is None else entry.value

    def pin(self, key: str, load: Callable[[], V]) -> V:
        """Load if needed and pin `key` so the budget never evicts it."""
        return self.get_or_load(key, load, pin=True)

    def unpin(self, key: str) -> bool:
        """Make `key` evictable again; False if it is not resident."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            entry.pinned = False
            return True

    def evict(self, key: str) -> bool:
        """Remove `key` now, pinned or not; True if it was resident."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return False
            self._resident -= entry.nbytes
            self._stats.evictions += 1
            evicted = [(key, entry.value)]
        self._notify_evicted(evicted)
        return True

    def clear(self) -> None:
        """Evict every resident entry, pinned ones included."""
        with self._lock:
            evicted = [(key, entry.value) for key, entry in self._entries.items()]
            self._entries.clear()
            self._resident = 0
            self._stats.evictions += len(evicted)
        self._notify_evicted(evicted)

    def entries(self) -> list[CacheEntryInfo]:
        """Snapshots of the resident entries, most recently used first."""
        with self._lock:
            return [
                CacheEntryInfo(key, e.nbytes, e.pinned, e.hits, e.loaded_at, e.last_used,
                               e.load_seconds)
                for key, e in reversed(self._entries.items())
            ]

    @property
    def resident_bytes(self) -> int:
        """Bytes held by resident entries."""
        with self._lock:
            return self._resident

    @property
    def budget_bytes(self) -> int:
        """The byte budget fixed at construction."""
        return self._budget

    @property
    def stats(self) -> CacheStats:
        """A copy of the counters."""
        with self._lock:
            return replace(self._stats)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def _hit_locked(self, key: str) -> _Entry[V] | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            entry.hits += 1
            entry.last_used = time.time()
            self._stats.hits += 1
        return entry

    def _load_and_insert(
        self, key: str, load: Callable[[], V], pin: bool
    ) -> tuple[V, list[tuple[str, V]]]:
        """Run `load` outside the lock, then insert under it; returns the value and the evicted."""
        started = time.perf_counter()
        try:
            value = load()
        except BaseException:
            with self._lock:
                self._stats.load_failures += 1
            raise
        seconds = time.perf_counter() - started
        with self._lock:
            self._stats.loads += 1
            self._stats.load_seconds_total += seconds
        if self._on_load is not None:
            self._on_load(key, seconds)
        nbytes = int(self._size_of(value))
        with self._lock:
            if nbytes > self._budget:
                raise AdapterTooLargeError(
                    f"adapter {key!r} needs {nbytes} bytes, over the cache budget of "
                    f"{self._budget} bytes", param="budget_bytes")
            pinned = sum(e.nbytes for e in self._entries.values() if e.pinned)
            if pinned + nbytes > self._budget:
                raise AdapterTooLargeError(
                    f"adapter {key!r} needs {nbytes} bytes but pinned entries use {pinned} of the "
                    f"{self._budget}-byte budget", param="budget_bytes")
            evicted: list[tuple[str, V]] = []
            now = time.time()
            self._entries[key] = _Entry(value, nbytes, pin, now, now, seconds)
            self._resident += nbytes
            for victim in [k for k, e in self._entries.items() if not e.pinned and k != key]:
                if self._resident <= self._budget:
                    break
                gone = self._entries.pop(victim)
                self._resident -= gone.nbytes
                evicted.append((victim, gone.value))
            self._stats.evictions += len(evicted)
            del self._inflight[key]
        return value, evicted

    def _notify_evicted(self, evicted: list[tuple[str, V]]) -> None:
        if self._on_evict is not None:
            for key, value in evicted:
                self._on_evict(key, value)
