"""The byte-budgeted adapter cache: LRU by bytes, pinning, single-flight loads, thread safety."""
from __future__ import annotations

import gc
import random
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest

from speft_core.errors import SpeftError
from speft_core.serving.cache import AdapterTooLargeError, ByteBudgetCache, CacheStats

WAIT = 5.0


class Blob:
    """A value with a declared size that can be weak-referenced."""

    def __init__(self, name: str, nbytes: int) -> None:
        self.name = name
        self.nbytes = nbytes


def make_cache(budget: int = 100, **kwargs) -> ByteBudgetCache[Blob]:
    return ByteBudgetCache(budget, size_of=lambda blob: blob.nbytes, **kwargs)


def loader(name: str, nbytes: int, calls: list[str] | None = None):
    def load() -> Blob:
        if calls is not None:
            calls.append(name)
        return Blob(name, nbytes)

    return load


@pytest.mark.parametrize("budget", [0, -1, 1.5, "10", True])
def test_budget_must_be_a_positive_int(budget):
    with pytest.raises(ValueError):
        ByteBudgetCache(budget, size_of=len)


def test_miss_loads_then_hit_returns_same_value_and_counts():
    cache = make_cache()
    calls: list[str] = []
    first = cache.get_or_load("a", loader("a", 10, calls))
    second = cache.get_or_load("a", loader("a", 10, calls))
    assert first is second and calls == ["a"]
    stats = cache.stats
    assert (stats.hits, stats.misses, stats.loads) == (1, 1, 1)
    [info] = cache.entries()
    assert (info.key, info.nbytes, info.hits, info.pinned) == ("a", 10, 1, False)
    assert info.last_used >= info.loaded_at and info.load_seconds >= 0
    assert "a" in cache and "b" not in cache and len(cache) == 1


def test_get_absent_returns_none_and_counts_nothing():
    cache = make_cache()
    assert cache.get("missing") is None
    assert cache.stats == CacheStats()


def test_get_hit_refreshes_lru_and_counts():
    cache = make_cache()
    cache.get_or_load("a", loader("a", 10))
    cache.get_or_load("b", loader("b", 10))
    assert [e.key for e in cache.entries()] == ["b", "a"]
    assert cache.get("a").name == "a"
    assert [e.key for e in cache.entries()] == ["a", "b"]
    assert cache.stats.hits == 1 and cache.entries()[0].hits == 1


def test_budget_evicts_least_recently_used_by_bytes():
    evicted: list[tuple[str, str]] = []
    cache = make_cache(100, on_evict=lambda key, blob: evicted.append((key, blob.name)))
    cache.get_or_load("a", loader("a", 40))
    cache.get_or_load("b", loader("b", 40))
    cache.get("a")
    cache.get_or_load("c", loader("c", 40))
    assert evicted == [("b", "b")]
    assert sorted(e.key for e in cache.entries()) == ["a", "c"]
    assert cache.resident_bytes == 80 and cache.stats.evictions == 1
    cache.get_or_load("d", loader("d", 100))
    assert [e.key for e in cache.entries()] == ["d"] and cache.resident_bytes == 100


def test_value_larger_than_budget_raises_and_is_not_cached():
    evicted: list[str] = []
    cache = make_cache(100, on_evict=lambda key, blob: evicted.append(key))
    cache.get_or_load("a", loader("a", 50))
    with pytest.raises(AdapterTooLargeError) as info:
        cache.get_or_load("huge", loader("huge", 101))
    assert isinstance(info.value, SpeftError)
    message = str(info.value)
    assert "huge" in message and "101" in message and "100" in message
    assert "huge" not in cache and "a" in cache and evicted == []
    assert cache.resident_bytes == 50


def test_pinned_entries_are_never_evicted_by_budget():
    cache = make_cache(100)
    cache.pin("a", loader("a", 40))
    cache.get_or_load("b", loader("b", 40))
    cache.get_or_load("c", loader("c", 40))
    assert "a" in cache and "b" not in cache and "c" in cache
    assert {e.key: e.pinned for e in cache.entries()} == {"a": True, "c": False}


def test_value_that_cannot_fit_beside_pinned_entries_raises():
    cache = make_cache(100)
    cache.pin("a", loader("a", 60))
    cache.get_or_load("b", loader("b", 30))
    with pytest.raises(AdapterTooLargeError, match="pinned entries use 60"):
        cache.get_or_load("c", loader("c", 50))
    assert "c" not in cache and "a" in cache and "b" in cache
    assert cache.resident_bytes == 90 <= cache.budget_bytes


def test_pin_flag_pins_an_already_resident_entry_and_unpin_releases_it():
    cache = make_cache(100)
    cache.get_or_load("a", loader("a", 60))
    cache.get_or_load("a", loader("a", 60), pin=True)
    assert cache.entries()[0].pinned
    cache.get_or_load("b", loader("b", 30))
    assert cache.unpin("a") is True
    assert cache.unpin("missing") is False
    cache.get_or_load("c", loader("c", 50))
    assert "a" not in cache and "b" in cache and "c" in cache


def test_evict_and_clear_remove_pinned_entries_and_call_on_evict():
    evicted: list[str] = []
    cache = make_cache(100, on_evict=lambda key, blob: evicted.append(key))
    cache.pin("a", loader("a", 10))
    cache.get_or_load("b", loader("b", 10))
    cache.get_or_load("c", loader("c", 10))
    assert cache.evict("a") is True and cache.evict("a") is False
    assert evicted == ["a"] and cache.resident_bytes == 20
    cache.clear()
    assert sorted(evicted) == ["a", "b", "c"]
    assert len(cache) == 0 and cache.resident_bytes == 0 and cache.stats.evictions == 3


def test_eviction_drops_every_reference_the_cache_holds():
    cache = make_cache(100)
    budget_ref = weakref.ref(cache.get_or_load("a", loader("a", 60)))
    explicit_ref = weakref.ref(cache.get_or_load("b", loader("b", 30)))
    cache.get_or_load("c", loader("c", 60))
    cache.evict("b")
    gc.collect()
    assert budget_ref() is None and explicit_ref() is None


def test_on_load_reports_key_and_seconds():
    seen: list[tuple[str, float]] = []
    cache = make_cache(on_load=lambda key, seconds: seen.append((key, seconds)))
    cache.get_or_load("a", loader("a", 10))
    [(key, seconds)] = seen
    assert key == "a" and seconds >= 0
    stats = cache.stats
    assert stats.loads == 1 and stats.load_seconds_total == pytest.approx(seconds)
    assert cache.entries()[0].load_seconds == pytest.approx(seconds)


def test_stats_is_a_copy():
    cache = make_cache()
    cache.stats.hits = 99
    assert cache.stats.hits == 0


def test_concurrent_misses_of_one_key_load_once():
    release = threading.Event()
    calls: list[str] = []

    def slow_load() -> Blob:
        calls.append("a")
        assert release.wait(WAIT)
        return Blob("a", 10)

    cache = make_cache()
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(cache.get_or_load, "a", slow_load) for _ in range(8)]
        while cache.stats.misses < 8:
            time.sleep(0.001)
        release.set()
        values = [f.result(timeout=WAIT) for f in futures]
    assert calls == ["a"] and all(v is values[0] for v in values)
    assert cache.stats.loads == 1 and len(cache) == 1


def test_failed_load_is_shared_by_waiters_and_not_cached():
    release = threading.Event()
    calls: list[str] = []

    def failing_load() -> Blob:
        calls.append("a")
        assert release.wait(WAIT)
        raise OSError("disk gone")

    cache = make_cache()
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(cache.get_or_load, "a", failing_load) for _ in range(4)]
        while cache.stats.misses < 4:
            time.sleep(0.001)
        release.set()
        errors = [f.exception(timeout=WAIT) for f in futures]
    assert calls == ["a"] and all(isinstance(e, OSError) for e in errors)
    assert all(e is errors[0] for e in errors)
    assert "a" not in cache and cache.stats.load_failures == 1
    assert cache.get_or_load("a", loader("a", 10, calls)).name == "a"
    assert calls == ["a", "a"]


@pytest.mark.parametrize("fails", [False, True])
def test_slow_load_of_one_key_never_blocks_other_keys(fails):
    started, release = threading.Event(), threading.Event()

    def slow_load() -> Blob:
        started.set()
        assert release.wait(WAIT)
        if fails:
            raise RuntimeError("load failed")
        return Blob("slow", 10)

    cache = make_cache()
    cache.get_or_load("warm", loader("warm", 10))
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(cache.get_or_load, "slow", slow_load)
        assert started.wait(WAIT)
        assert cache.get("warm").name == "warm"
        assert cache.get_or_load("warm", loader("warm", 10)).name == "warm"
        assert cache.get_or_load("other", loader("other", 10)).name == "other"
        assert not pending.done()
        release.set()
        if fails:
            with pytest.raises(RuntimeError):
                pending.result(timeout=WAIT)
        else:
            assert pending.result(timeout=WAIT).name == "slow"
    assert ("slow" in cache) is not fails


def test_stress_keeps_bytes_consistent_and_loads_single_flight():
    budget = 200
    sizes = {f"k{i}": 10 + 7 * i for i in range(20)}
    active: dict[str, int] = dict.fromkeys(sizes, 0)
    overlaps: list[str] = []
    guard = threading.Lock()
    over_budget: list[int] = []
    cache = make_cache(budget)

    def load_for(key: str):
        def load() -> Blob:
            with guard:
                active[key] += 1
                if active[key] > 1:
                    overlaps.append(key)
            time.sleep(0.0005)
            with guard:
                active[key] -= 1
            return Blob(key, sizes[key])

        return load

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(300):
            key = rng.choice(list(sizes))
            op = rng.random()
            if op < 0.7:
                assert cache.get_or_load(key, load_for(key)).name == key
            elif op < 0.85:
                cache.evict(key)
            else:
                cache.get(key)
            resident = cache.resident_bytes
            if resident > budget:
                over_budget.append(resident)

    with ThreadPoolExecutor(16) as pool:
        for future in [pool.submit(worker, seed) for seed in range(16)]:
            future.result(timeout=WAIT * 4)
    assert overlaps == [] and over_budget == []
    entries = cache.entries()
    assert cache.resident_bytes == sum(e.nbytes for e in entries) <= budget
    assert all(e.nbytes == sizes[e.key] for e in entries)
    stats = cache.stats
    assert stats.load_failures == 0 and stats.loads <= stats.misses
    assert stats.loads - stats.evictions == len(entries)
