"""Serving: one base model in memory, any number of sparse adapters chosen per request.

    engine = ServingEngine.load(path, "classification", name="minilm-l6")
    adapter = engine.adapter("adapter-1", fetch=lambda: blob, sha256=digest)
    engine.classify(adapter, ["a fine film"]).result()
"""
from .adapter import ServingAdapter, compose_adapters, prepare_adapter
from .cache import AdapterTooLargeError, ByteBudgetCache, CacheEntryInfo, CacheStats
from .engine import Classification, ServingEngine, ServingObserver, ServingOptions
from .generation import Completion, SamplingParams
from .synthetic import random_delta

__all__ = [
    "AdapterTooLargeError", "ByteBudgetCache", "CacheEntryInfo", "CacheStats", "Classification",
    "Completion", "SamplingParams", "ServingAdapter", "ServingEngine", "ServingObserver",
    "ServingOptions", "compose_adapters", "prepare_adapter", "random_delta",
]
