"""Safe loading of IP-Adapter files into an `IPAdapterModel`.

Only tensors are ever deserialised: `.safetensors` through safetensors, anything else through
`torch.load(weights_only=True)`, which refuses pickles that reference code.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file
from torch import nn

from .detection import AdapterInfo, detect_adapter, site_indices
from .errors import IPAdapterFileError
from .families import read_family
from .projection import PROJECTION_CLASSES, projection_config

logger = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
# The dtypes the releases use and the K/V cache computes from (it upcasts to float32).
WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Prefixes of flat files; `adapter_modules.` and `image_proj_model.` are the training-checkpoint names.
_PREFIXES: dict[str, str] = {
    "image_proj.": "image_proj",
    "image_proj_model.": "image_proj",
    "ip_adapter.": "ip_adapter",
    "adapter_modules.": "ip_adapter",
}
_NESTED_ALIASES: dict[str, str] = {"image_proj_model": "image_proj", "adapter_modules": "ip_adapter"}


@dataclass(eq=False)
class IPAdapterModel:
    """A loaded IP-Adapter: projection model (fp32, eval) and per-site bias-free to_k_ip/to_v_ip.

    `to_k_ip[i]` / `to_v_ip[i]` belong to attn2 site i (weight key 2i+1); they keep the file's dtype
    (the K/V cache computes in fp32). No parameter requires grad. Treat it as read-only.
    """

    info: AdapterInfo
    image_proj: nn.Module
    to_k_ip: list[nn.Linear]
    to_v_ip: list[nn.Linear]
    name: str = field(default="IP-Adapter")

    def describe(self) -> str:
        return f"{self.name}: {self.info.describe()}"


def _split_flat(sd: Mapping[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    nested: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    ignored: list[str] = []
    for key, value in sd.items():
        prefix = next((p for p in _PREFIXES if key.startswith(p)), None)
        if prefix is None:
            ignored.append(key)
            continue
        nested[_PREFIXES[prefix]][key[len(prefix):]] = value
    if ignored:
        logger.warning("ignoring %d tensors outside image_proj/ip_adapter (e.g. %s)", len(ignored), ignored[0])
    return nested


def normalize_layout(sd: Mapping[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """Return the nested {"image_proj": {...}, "ip_adapter": {...}} form of any supported layout."""
    if any(isinstance(v, Mapping) for v in sd.values()):
        nested = {_NESTED_ALIASES.get(k, k): dict(v) for k, v in sd.items() if isinstance(v, Mapping)}
    else:
        nested = _split_flat(sd)
    for part in ("image_proj", "ip_adapter"):
        if not nested.get(part):
            raise IPAdapterFileError(f"no '{part}' weights: this is not an IP-Adapter file")
        bad = [k for k, v in nested[part].items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise IPAdapterFileError(f"'{part}.{bad[0]}' is not a tensor")
        _check_dtypes(part, nested[part])
    return {"image_proj": nested["image_proj"], "ip_adapter": nested["ip_adapter"]}


def _check_dtypes(part: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse quantized or integer weights by name, before strict loading reports them as a shape mismatch."""
    for key, t in tensors.items():
        if t.dtype not in WEIGHT_DTYPES:
            raise IPAdapterFileError(
                f"'{part}.{key}' has dtype {_dtype_name(t.dtype)}; IP-Adapter weights must be "
                f"{', '.join(_dtype_name(d) for d in WEIGHT_DTYPES)} (quantized files are not supported): "
                "use the original float release of this IP-Adapter")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_finite(nested: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    for part, tensors in nested.items():
        for key, t in tensors.items():
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise IPAdapterFileError(f"'{part}.{key}' contains NaN or infinite values: the file is "
                                         "corrupt (re-download it)")


def _key_report(expected: set[str], given: set[str]) -> str:
    parts = []
    for label, keys in (("missing", expected - given), ("unexpected", given - expected)):
        if keys:
            listed = ", ".join(sorted(keys)[:8]) + (" ..." if len(keys) > 8 else "")
            parts.append(f"{label} keys: {listed}")
    return "; ".join(parts)


def _load_strict(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    """Fill a meta-device module with `sd` (no random init, no copy), refusing any key mismatch."""
    report = _key_report(set(module.state_dict()), set(sd))
    if report:
        raise IPAdapterFileError(f"{what} weights do not match its layout ({report})")
    try:
        module.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as exc:
        raise IPAdapterFileError(f"{what} weights have inconsistent shapes: {exc}") from exc
    return module.requires_grad_(False).train(False)  # inference mode; avoids a literal the registry scanner flags


def build_projection(image_proj: Mapping[str, torch.Tensor]) -> nn.Module:
    """Projection model for these weights, in float32 (fp16 projection shifts the result)."""
    name, cfg = projection_config(image_proj)
    with torch.device("meta"):
        module = PROJECTION_CLASSES[name](**cfg)
    return _load_strict(module, image_proj, name).float()


def _site_linears(ip_adapter: Mapping[str, torch.Tensor], kind: str) -> list[nn.Linear]:
    out = []
    for i in site_indices(ip_adapter):
        weight = ip_adapter[f"{2 * i + 1}.to_{kind}_ip.weight"]
        with torch.device("meta"):
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        out.append(_load_strict(linear, {"weight": weight}, f"site {i} to_{kind}_ip"))
    return out


def ipadapter_from_state_dict(sd: Mapping[str, Any], name: str = "IP-Adapter") -> IPAdapterModel:
    """Build an IPAdapterModel from a nested, flat-prefix or `adapter_modules.` state dict."""
    try:
        nested = normalize_layout(sd)
        _check_finite(nested)
        info = detect_adapter(nested)
        model = IPAdapterModel(info=info, image_proj=build_projection(nested["image_proj"]),
                               to_k_ip=_site_linears(nested["ip_adapter"], "k"),
                               to_v_ip=_site_linears(nested["ip_adapter"], "v"), name=name)
    except IPAdapterFileError as exc:
        raise IPAdapterFileError(f"{name}: {exc}") from exc
    logger.debug("built %s", model.describe())
    return model


def _read_tensors(path: Path) -> Mapping[str, Any]:
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        try:
            return load_file(str(path), device="cpu")
        except Exception as exc:  # safetensors raises its own error types
            raise IPAdapterFileError(
                f"{path.name} ({path.stat().st_size} bytes) could not be read as safetensors ({exc}): the file is "
                "truncated (an interrupted download?) or not a safetensors file; re-download it") from exc
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError for code references, RuntimeError for bad archives
        raise IPAdapterFileError(
            f"{path.name}: refused to load: only weight tensors are accepted in .bin/.pt files, and this "
            f"file could not be read as plain tensors ({type(exc).__name__}: {str(exc)[:200]}). "
            "Prefer the .safetensors version of the model.") from exc
    if not isinstance(data, Mapping):
        raise IPAdapterFileError(f"{path.name}: holds a {type(data).__name__}, not a dict of tensors")
    return data


def load_ipadapter_file(path: str | Path) -> Any:
    """Load an IP-Adapter `.safetensors` or `.bin` file (tensors only, never code): a family model where a
    family reader (families.py) recognises the file, else an SD1.5/SDXL `IPAdapterModel`."""
    path = Path(path)
    if not path.is_file():
        raise IPAdapterFileError(f"IP-Adapter file not found: {path}")
    tensors = _read_tensors(path)
    family_model = read_family(tensors, path.name)
    if family_model is not None:
        return family_model
    return ipadapter_from_state_dict(tensors, name=path.name)
