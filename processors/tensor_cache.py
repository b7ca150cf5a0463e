"""Bounded caches of tensors the engine can rebuild cheaply, and an account of what every cache holds.

The engine keeps what sampling would otherwise recompute at every step and site (image K/V per site, K/V rows
per batch layout, masks per token grid). Those caches must not outlive their use: the host glue frees them at
the end of a sampling run and when the model is moved or unloaded (docs/architecture.md, "Memory"), and each
is bounded in entries. Every store is listed in a module-level weak registry, so `cache_stats()` can say what
the pack holds (the memory route, the tests) without keeping any store alive.
"""

from __future__ import annotations

import dataclasses
import threading
import weakref
from collections import OrderedDict
from typing import Any, Callable, Hashable, Iterator, Protocol, TypeVar

import torch

V = TypeVar("V")
_MISSING = object()


class TensorStore(Protocol):
    """Anything that can list the tensors it keeps between calls."""

    def tensors(self) -> list[torch.Tensor]: ...

    def __len__(self) -> int: ...


_registry: "weakref.WeakKeyDictionary[TensorStore, str]" = weakref.WeakKeyDictionary()
# Stores register from the sampling thread; the server reads the registry from its own thread.
_registry_lock = threading.Lock()


def track(store: TensorStore, name: str) -> None:
    """List `store` under `name` in `cache_stats()` for as long as something else keeps it alive."""
    with _registry_lock:
        _registry[store] = name


def tensors_in(value: Any) -> Iterator[torch.Tensor]:
    """The tensors inside a cached value: a tensor, a tuple/list of values, or a dataclass of them."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from tensors_in(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from tensors_in(getattr(value, f.name))


def same_device(a: torch.device, b: torch.device) -> bool:
    """`cuda` and `cuda:0` name the same device when one of them has no index."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


class TensorCache:
    """An LRU map from keys to values holding tensors, with at most `capacity` entries.

    `get(key, build)` returns the cached value or builds, caches and returns it; a built None is cached too
    (e.g. "nothing to add for this layout"). Past the bound the least recently used entry goes: a caller
    whose working set exceeds the bound rebuilds, it never grows the cache.
    """

    def __init__(self, name: str, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"a TensorCache needs room for at least one entry; got capacity {capacity}")
        self.name = name
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        track(self, name)

    def get(self, key: Hashable, build: Callable[[], V]) -> V:
        value = self._entries.get(key, _MISSING)
        if value is _MISSING:
            value = self._entries[key] = build()
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(key)
        return value

    def clear(self) -> None:
        self._entries.clear()

    def keep_device(self, device: torch.device) -> None:
        """Drop every entry that holds a tensor on another device (rebuilt there when next asked for)."""
        for key, value in list(self._entries.items()):
            if any(not same_device(t.device, device) for t in tensors_in(value)):
                del self._entries[key]

    def __len__(self) -> int:
        return len(self._entries)

    def tensors(self) -> list[torch.Tensor]:
        # list() of a dict view runs in C under the GIL: a consistent snapshot while another thread samples.
        return [t for value in list(self._entries.values()) for t in tensors_in(value)]


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return str(t.device), t.untyped_storage().data_ptr()


def cache_stats() -> dict:
    """What every live store holds: entries, distinct tensors and the bytes of their distinct storages
    (views and expanded tensors share storage and are counted once), in total, per device and per store name."""
    with _registry_lock:
        stores = list(_registry.items())
    total: dict[str, Any] = {"stores": 0, "entries": 0, "tensors": 0, "bytes": 0, "by_device": {}, "by_cache": {}}
    seen_tensors: set[int] = set()
    seen_storages: set[tuple[str, int]] = set()
    for store, name in stores:
        part = total["by_cache"].setdefault(name, {"stores": 0, "entries": 0, "tensors": 0, "bytes": 0})
        held = store.tensors()
        for row in (total, part):
            row["stores"] += 1
            row["entries"] += len(store)
        for t in held:
            if id(t) in seen_tensors:
                continue
            seen_tensors.add(id(t))
            for row in (total, part):
                row["tensors"] += 1
            storage = _storage_key(t)
            if storage in seen_storages:
                continue
            seen_storages.add(storage)
            size = t.untyped_storage().nbytes()
            for row in (total, part):
                row["bytes"] += size
            total["by_device"][str(t.device)] = total["by_device"].get(str(t.device), 0) + size
    return total
