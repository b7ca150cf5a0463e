"""Adapter families beyond the SD1.5/SDXL attn2 adapters (FaceID, Flux, SD3.5).

Each family contributes a reader: given a loaded file's tensors (flat or nested, as read) and the file name,
it returns that family's adapter model when the keys and shapes are its own, else None. Readers are tried in
order before the SD1.5/SDXL adapter path, so a family recognised here never reaches the attn2 detection (and
its "not an IP-Adapter" errors). A reader that recognises its file but finds it broken raises
IPAdapterFileError naming the file and what is wrong.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

from ..families.sd3 import read_sd3_adapter
from .faceid import read_faceid

FamilyReader = Callable[[Mapping[str, Any], str], Optional[Any]]


def read_flux_adapter(tensors: Mapping[str, Any], name: str) -> Optional[Any]:
    """Flux XLabs / InstantX (imported here, not above: processors.families.flux imports this package)."""
    from ..families.flux import read_flux_adapter as read

    return read(tensors, name)


# Family readers, tried in order (each module adds its reader here with one line).
READERS: tuple[FamilyReader, ...] = (read_flux_adapter, read_sd3_adapter, read_faceid)


def read_family(tensors: Mapping[str, Any], name: str) -> Optional[Any]:
    """The first family model a reader builds from `tensors`, or None when none recognises them."""
    for reader in READERS:
        model = reader(tensors, name)
        if model is not None:
            return model
    return None
