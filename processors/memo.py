"""Tensors derived from other tensors, kept exactly as long as their sources live.

The attention hot path turns the same cached inputs into the same derived tensors at every step and site: a
mask's log-bias, K/V with a null token appended, a per-row scale times a mask. Recomputing them costs
kernels and allocations per call. Keyed by the identity of the source tensors (weak references, so a
derived tensor never keeps its source alive, and goes when any source is freed) plus plain parameters, and
bounded, so nothing here outlives the caches that own the sources. Listed in `tensor_cache.cache_stats()`.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Callable, Hashable, Sequence, TypeVar

import torch

from .tensor_cache import tensors_in, track

T = TypeVar("T")


class DerivedTensors:
    """`get(sources, params, make)`: `make()` once per (sources, params) while every source is alive."""

    def __init__(self, name: str, capacity: int = 128) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[tuple, tuple[tuple[weakref.ref, ...], Any]] = OrderedDict()
        track(self, name)

    def get(self, sources: Sequence[torch.Tensor], params: Hashable, make: Callable[[], T]) -> T:
        key = (tuple(map(id, sources)), params)
        entry = self._entries.get(key)
        if entry is not None and all(ref() is source for ref, source in zip(entry[0], sources)):
            self._entries.move_to_end(key)
            return entry[1]
        value = make()
        drop = self._dropper(key)
        self._entries[key] = (tuple(weakref.ref(s, drop) for s in sources), value)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return value

    def _dropper(self, key: tuple) -> Callable[[weakref.ref], None]:
        entries = weakref.ref(self._entries)

        def drop(dead: weakref.ref) -> None:
            table = entries()
            entry = table.get(key) if table is not None else None
            if entry is not None and any(ref is dead for ref in entry[0]):
                del table[key]

        return drop

    def __len__(self) -> int:
        return len(self._entries)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held (memory accounting; a snapshot, safe while another thread samples)."""
        return [t for _, value in list(self._entries.values()) for t in tensors_in(value)]
