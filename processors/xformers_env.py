"""What the installed xformers can offer, found out once per process.

xformers is optional. It may be missing, fail to import (an ABI or flash-attn version mismatch raises at
import time), or import without its compiled library (built for another torch/CUDA). Each case gets a
sentence a user can act on, instead of xformers' bare "No operator found".
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class XformersStatus:
    fmha: Optional[ModuleType]  # xformers.ops.fmha, or None when xformers cannot be used at all
    version: Optional[str]
    problem: str  # empty when the compiled library loaded; otherwise why every operator is refused

    @property
    def importable(self) -> bool:
        return self.fmha is not None


def _library_problem(xformers: ModuleType, torch_version: str) -> str:
    if getattr(xformers, "_has_cpp_library", False):
        return ""
    built_for = ""
    try:
        from xformers import _cpp_lib

        error = getattr(_cpp_lib, "_cpp_library_load_exception", None)
        meta = getattr(getattr(error, "build_info", None), "metadata", None) or {}
        version = meta.get("version", {}) if isinstance(meta, dict) else {}
        if version:
            cuda = version.get("cuda")
            cuda_text = f"CUDA {cuda // 100}.{cuda % 100}" if isinstance(cuda, int) else "an unknown CUDA"
            built_for = f"; it was built for torch {version.get('torch')} with {cuda_text}, this is torch {torch_version}"
    except Exception:  # the private module moved: keep the generic sentence
        pass
    return "xformers could not load its compiled library" + built_for


@functools.lru_cache(maxsize=1)
def xformers_status() -> XformersStatus:
    import torch

    try:
        import xformers
        import xformers.ops  # noqa: F401  (registers the fmha operators)
        from xformers.ops import fmha
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] == "xformers":
            return XformersStatus(None, None, "xformers is not installed")
        return XformersStatus(None, None, f"xformers failed to import: {error}")
    except ImportError as error:
        return XformersStatus(None, None, f"xformers failed to import: {error}")
    except (OSError, RuntimeError) as error:
        return XformersStatus(None, None, f"xformers failed to import: {error}")
    if not hasattr(fmha, "memory_efficient_attention_forward"):
        return XformersStatus(None, getattr(xformers, "__version__", None),
                              "this xformers build has no memory_efficient_attention (missing mslk package?)")
    version = getattr(xformers, "__version__", None)
    return XformersStatus(fmha, version, _library_problem(xformers, torch.__version__))


def reset() -> None:
    """Forget the cached status (tests make xformers unimportable and look again)."""
    xformers_status.cache_clear()
