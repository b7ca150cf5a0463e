"""TensorCache (bounded LRU of tensors) and cache_stats (the account of every live store)."""
from __future__ import annotations

import gc
from dataclasses import dataclass

import pytest
import torch

from processors.tensor_cache import TensorCache, cache_stats, same_device, track


def _stats_for(name: str) -> dict:
    return cache_stats()["by_cache"].get(name, {"stores": 0, "entries": 0, "tensors": 0, "bytes": 0})


def test_builds_once_per_key_and_caches_none():
    cache = TensorCache("test once", capacity=4)
    calls = []

    def build(value):
        calls.append(value)
        return value

    first = torch.ones(3)
    assert cache.get("a", lambda: build(first)) is first
    assert cache.get("a", lambda: build(torch.zeros(3))) is first
    assert cache.get("none", lambda: build(None)) is None
    assert cache.get("none", lambda: build(torch.zeros(1))) is None
    assert len(calls) == 2 and len(cache) == 2


def test_least_recently_used_entry_goes_past_the_bound():
    cache = TensorCache("test lru", capacity=2)
    a, b, c = torch.zeros(1), torch.zeros(2), torch.zeros(3)
    cache.get("a", lambda: a)
    cache.get("b", lambda: b)
    cache.get("a", lambda: None)  # touch a: b is now the oldest
    cache.get("c", lambda: c)
    assert len(cache) == 2
    assert cache.get("a", lambda: None) is a and cache.get("c", lambda: None) is c
    assert cache.get("b", lambda: "rebuilt") == "rebuilt"


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="at least one entry"):
        TensorCache("test zero", capacity=0)


@dataclass(frozen=True)
class Pair:
    k: torch.Tensor
    v: torch.Tensor
    scale: float


def test_keep_device_drops_entries_with_a_tensor_elsewhere():
    cache = TensorCache("test devices", capacity=8)
    cache.get("cpu pair", lambda: Pair(torch.zeros(2), torch.zeros(2), 1.0))
    cache.get("mixed", lambda: (torch.zeros(1), torch.zeros(1, device="meta")))
    cache.get("meta", lambda: torch.zeros(4, device="meta"))
    cache.get("nothing", lambda: None)
    cache.keep_device(torch.device("cpu"))
    assert len(cache) == 2
    assert isinstance(cache.get("cpu pair", lambda: None), Pair)
    assert cache.get("nothing", lambda: "rebuilt") is None


def test_same_device_treats_a_missing_index_as_any():
    assert same_device(torch.device("cuda"), torch.device("cuda", 1))
    assert not same_device(torch.device("cuda", 0), torch.device("cuda", 1))
    assert not same_device(torch.device("cpu"), torch.device("meta"))


def test_stats_count_distinct_storages_once():
    name = "test stats"
    cache = TensorCache(name, capacity=8)
    base = torch.zeros(10, 4, dtype=torch.float32)  # 160 bytes
    cache.get("base", lambda: base)
    cache.get("view", lambda: base[:5])  # same storage
    cache.get("expanded", lambda: torch.zeros(1, 4, dtype=torch.float16).expand(6, -1))  # 8 bytes
    cache.get("same object twice", lambda: (base, base))
    stats = _stats_for(name)
    assert stats == {"stores": 1, "entries": 4, "tensors": 3, "bytes": 160 + 8}
    total = cache_stats()
    assert total["by_device"]["cpu"] >= 168 and total["bytes"] >= 168
    cache.clear()
    assert _stats_for(name) == {"stores": 1, "entries": 0, "tensors": 0, "bytes": 0}


def test_registry_is_weak_and_takes_any_store():
    class Foreign:
        def __init__(self) -> None:
            self.held = [torch.zeros(8, dtype=torch.float64)]

        def tensors(self) -> list[torch.Tensor]:
            return self.held

        def __len__(self) -> int:
            return len(self.held)

    foreign = Foreign()
    track(foreign, "test foreign")
    cache = TensorCache("test weak", capacity=1)
    cache.get("x", lambda: torch.zeros(2))
    assert _stats_for("test foreign") == {"stores": 1, "entries": 1, "tensors": 1, "bytes": 64}
    assert _stats_for("test weak")["stores"] == 1
    del foreign, cache
    gc.collect()
    assert _stats_for("test foreign")["stores"] == 0 and _stats_for("test weak")["stores"] == 0
