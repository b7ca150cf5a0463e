"""The unified loader's presets: which identified files serve a preset for a given model, or why none does.

A preset names an adapter kind (by projection and, for base adapters, by encoder) for the model's family; the
files are matched by their shapes (identify.py), the model by its attn2 sites. File names only order files
whose shapes are identical: the preset's `prefer` / `avoid` name parts break exactly those ties (see PRESETS).
Pure logic, no file access: the caller identifies the files and loads the choice.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Collection, Mapping, Optional, Sequence

from .detection import AdapterInfo, base_model_name
from .errors import IPAdapterMismatchError
from .identify import Identified
from .validation import SiteSpec, validate_against_sites

_H94 = "huggingface.co/h94/IP-Adapter"
# What to download, by the encoder an adapter is fed with (the standard pack's README names these files).
ENCODER_DOWNLOADS: dict[str, str] = {
    "ViT-H": f"CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors ({_H94}, models/image_encoder/model.safetensors, renamed)",
    "ViT-bigG": (f"CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors ({_H94}, sdxl_models/image_encoder/"
                 "model.safetensors, renamed)"),
    "ViT-L": "a ViT-L/14 CLIP vision model (openai/clip-vit-large-patch14)",
}


@dataclass(frozen=True)
class Preset:
    """One choice of the `preset` input: the adapter kind it names and how names break shape ties."""

    name: str                                # the standard pack's exact string
    variant: str                             # AdapterInfo.variant: "base", "plus" or "full-face"
    bigg: Optional[bool] = None              # base adapters: fed by ViT-bigG (True) or by another encoder (False)
    prefer: tuple[str, ...] = ()             # file-name parts that win a tie between same-shaped files
    avoid: tuple[str, ...] = ()              # file-name parts that lose it
    downloads: Mapping[str, str] = field(default_factory=dict)  # base model -> adapter file to download
    encoder: Optional[str] = "ViT-H"         # the CLIP vision its released adapters use (None: they use none)

    def wants(self, info: AdapterInfo) -> bool:
        if info.variant != self.variant:
            return False
        return self.bigg is None or (info.clip_encoder == "ViT-bigG") == self.bigg

    def needs_clip(self, info: AdapterInfo) -> bool:
        """Whether a chosen adapter needs a CLIP vision file to be usable (every adapter but some FaceID)."""
        return True

    def name_rank(self, file_name: str) -> int:
        """Higher for names that say this preset; only compared between files of identical shapes."""
        name = os.path.basename(file_name).lower()
        return sum(part in name for part in self.prefer) - sum(part in name for part in self.avoid)

    def name_says_it(self, file_name: str) -> bool:
        name = os.path.basename(file_name).lower()
        return (not self.prefer or self.prefer[0] in name) and not any(part in name for part in self.avoid)


def _sd15(file: str) -> str:
    return f"{file} ({_H94}, models/)"


def _sdxl(file: str) -> str:
    return f"{file} ({_H94}, sdxl_models/)"


# Same-shaped twins among the released files, and the name parts that tell them apart:
#   light vs standard (ip-adapter_sd15_light[_v11] vs ip-adapter_sd15): "light" (and "v11", the newer light)
#   plus face vs plus (ip-adapter-plus-face_* vs ip-adapter-plus_*): "face"
#   plus vs ostris' composition adapter (ip_plus_composition_*, Resampler too): "composition"
# VIT-G and FULL FACE have no twin: their shapes alone decide.
PRESETS: tuple[Preset, ...] = (
    Preset("LIGHT - SD1.5 only (low strength)", "base", bigg=False, prefer=("light", "v11"),
           downloads={"SD1.5": _sd15("ip-adapter_sd15_light_v11.bin")}),
    Preset("STANDARD (medium strength)", "base", bigg=False, avoid=("light",),
           downloads={"SD1.5": _sd15("ip-adapter_sd15.safetensors"),
                      "SDXL": _sdxl("ip-adapter_sdxl_vit-h.safetensors")}),
    Preset("VIT-G (medium strength)", "base", bigg=True, encoder="ViT-bigG",
           downloads={"SD1.5": _sd15("ip-adapter_sd15_vit-G.safetensors"),
                      "SDXL": _sdxl("ip-adapter_sdxl.safetensors")}),
    Preset("PLUS (high strength)", "plus", avoid=("face", "composition"),
           downloads={"SD1.5": _sd15("ip-adapter-plus_sd15.safetensors"),
                      "SDXL": _sdxl("ip-adapter-plus_sdxl_vit-h.safetensors")}),
    Preset("PLUS FACE (portraits)", "plus", prefer=("face",), avoid=("composition",),
           downloads={"SD1.5": _sd15("ip-adapter-plus-face_sd15.safetensors"),
                      "SDXL": _sdxl("ip-adapter-plus-face_sdxl_vit-h.safetensors")}),
    Preset("FULL FACE - SD1.5 only (portraits stronger)", "full-face",
           downloads={"SD1.5": _sd15("ip-adapter-full-face_sd15.safetensors")}),
)
PRESET_NAMES: tuple[str, ...] = tuple(p.name for p in PRESETS)


def preset_named(name: str, presets: Sequence[Preset] = PRESETS) -> Preset:
    """The preset called `name` among `presets` (the Unified Loader's, or FACEID_PRESETS)."""
    for preset in presets:
        if preset.name == name:
            return preset
    raise ValueError(f"preset: {name!r} is not one of {', '.join(repr(p.name) for p in presets)}")


class NothingFits(IPAdapterMismatchError):
    """No adapter / CLIP vision pair in the model folders serves the preset for this model."""


@dataclass(frozen=True)
class FaceIDPreset(Preset):
    """A Unified Loader FaceID preset: a FaceID variant for the base models it was released for, with the LoRA
    it was trained with (`lora`) and, for Plus, which of Plus / Plus V2 the preset means (`plus_v2`)."""

    lora: bool = False
    plus_v2: bool = False

    def wants(self, info: AdapterInfo) -> bool:
        return info.variant == self.variant and info.base_model in self.downloads

    def needs_clip(self, info: AdapterInfo) -> bool:
        return bool(getattr(info, "needs_clip_vision", True))


_FACEID_HUB = "huggingface.co/h94/IP-Adapter-FaceID"


def _faceid(file: str) -> str:
    return f"{file} ({_FACEID_HUB})"


# Same-shaped twins: FaceID Plus vs Plus V2 (SD1.5: "v2" in the name), Portrait vs Portrait v11 (SD1.5: "v11",
# the newer). The LoRA files are named after their adapter (<adapter>_lora.safetensors).
FACEID_PRESETS: tuple[FaceIDPreset, ...] = (
    FaceIDPreset("FACEID", "faceid", lora=True, encoder=None,
                 downloads={"SD1.5": _faceid("ip-adapter-faceid_sd15.bin"),
                            "SDXL": _faceid("ip-adapter-faceid_sdxl.bin")}),
    FaceIDPreset("FACEID PLUS - SD1.5 only", "faceid-plus", lora=True, avoid=("v2",),
                 downloads={"SD1.5": _faceid("ip-adapter-faceid-plus_sd15.bin")}),
    FaceIDPreset("FACEID PLUS V2", "faceid-plus", lora=True, plus_v2=True, prefer=("v2",),
                 downloads={"SD1.5": _faceid("ip-adapter-faceid-plusv2_sd15.bin"),
                            "SDXL": _faceid("ip-adapter-faceid-plusv2_sdxl.bin")}),
    FaceIDPreset("FACEID PORTRAIT (style transfer)", "faceid-portrait", prefer=("portrait", "v11"), encoder=None,
                 downloads={"SD1.5": _faceid("ip-adapter-faceid-portrait-v11_sd15.bin"),
                            "SDXL": _faceid("ip-adapter-faceid-portrait_sdxl.bin")}),
    FaceIDPreset("FACEID PORTRAIT UNNORM - SDXL only (strong)", "faceid-portrait-unnorm", encoder=None,
                 downloads={"SDXL": _faceid("ip-adapter-faceid-portrait_sdxl_unnorm.bin")}),
)
FACEID_PRESET_NAMES: tuple[str, ...] = tuple(p.name for p in FACEID_PRESETS)


@dataclass(frozen=True)
class Choice:
    preset: Preset
    adapter: Identified
    clip_vision: Optional[Identified]  # None only where the preset's adapter needs no CLIP vision

    @property
    def name_says_it(self) -> bool:
        return self.preset.name_says_it(self.adapter.name)


def model_family(sites: Sequence[SiteSpec]) -> str:
    """"SD1.5", "SDXL" or a description of what the model's cross-attention width is."""
    contexts = sorted({s.context_dim for s in sites})
    names = {base_model_name(c) for c in contexts}
    if len(names) == 1 and "unknown" not in names:
        return names.pop()
    return f"a model with cross-attention width {'/'.join(map(str, contexts)) or 'none'}"


def fits_model(info: AdapterInfo, sites: Sequence[SiteSpec]) -> bool:
    try:
        validate_against_sites(info, sites)
    except IPAdapterMismatchError:
        return False
    return True


def choose(preset: Preset, sites: Sequence[SiteSpec], adapters: Sequence[Identified],
           encoders: Sequence[Identified], reuse: Collection[str] = ()) -> Choice:
    """The adapter and CLIP vision files for `preset` on the model with these attn2 sites.

    Adapters of the preset's kind that fit every site, best name first (ties by folder order); the first
    of them with a CLIP vision file whose output fits it wins. Paths in `reuse` (already loaded upstream)
    win otherwise equal choices. Raises NothingFits with the full inventory when no pair exists."""
    fitting = [a for a in adapters if a.info is not None and preset.wants(a.info) and fits_model(a.info, sites)]
    order = {a.path: i for i, a in enumerate(fitting)}
    fitting.sort(key=lambda a: (-preset.name_rank(a.name), a.path not in reuse, order[a.path]))
    for adapter in fitting:
        clips = [e for e in encoders if e.info is not None and e.info.fits(adapter.info)]
        clips.sort(key=lambda e: e.path not in reuse)  # stable: folder order otherwise
        if clips or not preset.needs_clip(adapter.info):
            return Choice(preset, adapter, clips[0] if clips else None)
    raise NothingFits(nothing_fits_message(preset, sites, adapters, encoders, fitting))


def _inventory(title: str, files: Sequence[Identified]) -> list[str]:
    lines = [f"{title}:"]
    lines += [f"  - {f.name}: {f.describe()}" for f in files] or ["  (no files)"]
    return lines


def nothing_fits_message(preset: Preset, sites: Sequence[SiteSpec], adapters: Sequence[Identified],
                         encoders: Sequence[Identified], fitting: Sequence[Identified] = ()) -> str:
    family = model_family(sites)
    head = f"preset {preset.name!r}: no file in the model folders fits it for this {family} model."
    if fitting:
        info = fitting[0].info
        want = info.clip_encoder or "an encoder"
        why = (f"The IP-Adapter {fitting[0].name} fits, but no CLIP vision file outputs the {info.clip_width}-d "
               f"{info.clip_output} it is fed with ({want}). Download into models/clip_vision: "
               f"{ENCODER_DOWNLOADS.get(want, 'the CLIP vision model it was trained with')}.")
    elif family in preset.downloads:
        clip = (f"; and, if missing, into models/clip_vision: {ENCODER_DOWNLOADS[preset.encoder]}"
                if preset.encoder else "")
        why = (f"Download into models/ipadapter: {preset.downloads[family]}{clip}. Any file name works: files "
               "are recognised by their tensor shapes.")
    else:
        others = ", ".join(sorted(preset.downloads)) or "no base model"
        why = f"This preset exists for {others} only; choose another preset for this model."
    lines = [head, why]
    lines += _inventory("IP-Adapter files found", adapters)
    lines += _inventory("CLIP vision files found", encoders)
    return "\n".join(lines)


def choose_lora(preset: Preset, adapter: Identified, loras: Sequence[Identified]) -> Identified:
    """The LoRA file trained with `adapter` (same rank, attention layers and base model, from its shapes). Ties
    between same-shaped files: the name that contains the adapter's file name, then the preset's name parts."""
    fitting = [f for f in loras if f.info is not None and f.info.fits(adapter.info)]
    stem = os.path.splitext(os.path.basename(adapter.name))[0].lower()
    order = {f.path: i for i, f in enumerate(fitting)}
    fitting.sort(key=lambda f: (stem not in os.path.basename(f.name).lower(), -preset.name_rank(f.name),
                                order[f.path]))
    if fitting:
        return fitting[0]
    info = adapter.info
    lines = [f"preset {preset.name!r}: no LoRA in the loras folder fits the FaceID adapter {adapter.name} (a "
             f"rank-{info.lora_rank} LoRA of the {info.base_model} UNet's attention, {info.lora_modules} layers). "
             f"Download into models/loras: {stem}_lora.safetensors ({_FACEID_HUB}), or set lora_strength to 0."]
    lines += _inventory("LoRA files found", loras)
    raise NothingFits("\n".join(lines))
