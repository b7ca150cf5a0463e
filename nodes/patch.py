"""The attn2 replace patch: immutable, composable, and cheap on the hot path.

One `IPAdapterAttn2Patch` per attn2 site. It holds every adapter applied to the model so far (an
`AdapterApplication` each, shared by all sites) and, if another pack had already installed a replace
callable at that site, that callable, which it calls instead of the text attention and adds the adapters
to. Applying another adapter builds new patch objects; registered ones are never mutated, so upstream
models (cached by ComfyUI) keep their behaviour.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from comfy.ldm.modules.attention import get_attn_precision
from comfy.patcher_extension import CallbacksMP

from ..processors.backends import AttentionOpConfig
from ..processors.ip_attention import IPBranch, XFormersIPAdapterAttnProcessor
from ..processors.ipadapter import AdapterKVCache
from ..processors.ipadapter.kv_cache import rows_for_chunks
from ..processors.masks import mask_to_tokens
from ..processors.step_window import ALWAYS, active_in_window
from ..processors.tensor_cache import TensorCache
from .sites import Attn2Site

logger = logging.getLogger(__name__)

# transformer_options key through which PatchXformersModelAttention tells our patches its operator
MODEL_OP_KEY = "xformers_ipadapter_attention_op"


# Bounds of the layout-keyed caches (see docs/architecture.md, "Memory"). A sampling run meets one or two batch
# layouts per site (cond and uncond batched together, or apart when memory is short) and a few more with area
# conds, PerpNeg or DualCFG; four per site hold those without rebuilding. A UNet has at most four token grids
# per latent size (SD1.5: 1/8 to 1/64 of the image; SDXL fewer), so 16 masks cover four grids in four layouts.
# A run that cycles through more rebuilds (one torch.cat, one interpolate) instead of growing.
ROW_LAYOUTS_PER_SITE = 4
MASK_ENTRIES = 16


@dataclass(eq=False)
class AdapterApplication:
    """One Apply node's adapter: image K/V per site, per-site weights, window, mask and operator.

    Read-only after construction except for caches (image K/V, assembled K/V rows, resized masks, the
    current step's window decision), which depend only on inputs and are shared by clones on purpose. The
    caches hold only what is cheap to rebuild: `release()` frees them (end of a run, model unloaded) and
    `keep_device()` drops what is on another device (model moved).
    """

    kv: AdapterKVCache
    swaps: tuple[bool, ...]  # per site: the image goes to the negative rows (precise weight types)
    sigma_window: tuple[float, float] = ALWAYS  # (sigma_start, sigma_end): active while end <= sigma <= start
    mask: Optional[torch.Tensor] = None  # [Bm, H, W] float
    config: Optional[AttentionOpConfig] = None
    label: str = "IP-Adapter"
    _rows: TensorCache = field(init=False, repr=False)
    _masks: TensorCache = field(init=False, repr=False)
    _step: list = field(default_factory=lambda: [None, True], repr=False)  # [sigmas tensor, active]
    _notices: set = field(default_factory=set, repr=False)  # frame-alignment notices already logged

    def __post_init__(self) -> None:
        self._rows = TensorCache("K/V rows", ROW_LAYOUTS_PER_SITE * len(self.swaps))
        self._masks = TensorCache("masks", MASK_ENTRIES)

    def __deepcopy__(self, memo: dict) -> "AdapterApplication":
        return self

    def release(self) -> None:
        """Free every cached tensor (and the step's sigmas); all are rebuilt where next needed."""
        self.kv.release()
        self._rows.clear()
        self._masks.clear()
        self._step[:] = [None, True]
        self._notices.clear()  # each run says once what it has to say about frames

    def keep_device(self, device: torch.device) -> None:
        """The model moved to `device`: free what is cached anywhere else."""
        self.kv.keep_device(device)
        self._rows.keep_device(device)
        self._masks.keep_device(device)
        self._step[:] = [None, True]  # the next step decides again (one host read), wherever its sigmas live

    def active_at(self, extra_options: dict) -> bool:
        """In the start/end window? One host sync per sampling step at most (not per call), none when the
        window is the whole schedule: the decision is kept for the step's sigmas tensor object."""
        return active_in_window(self.sigma_window, self._step, extra_options)

    def branch(self, site: Attn2Site, q: torch.Tensor, extra_options: dict,
               dtype: Optional[torch.dtype] = None) -> Optional[IPBranch]:
        """This adapter's image attention at `site` for these queries, or None when it adds nothing. K/V, the
        per-row scale and the mask come cached in `dtype` (the processor's compute dtype; default q's), so
        nothing is cast per call."""
        weight = self.kv.site_weights[site.index]
        if weight == 0.0 or not self.active_at(extra_options):
            return None
        dtype = q.dtype if dtype is None else dtype
        chunks = tuple(extra_options.get("cond_or_uncond") or (0,))
        batch = q.shape[0]
        frames = self._frames(extra_options, batch // len(chunks))
        # None (nothing to add for this layout) is cached too
        rows = self._rows.get((site.index, q.device, dtype, chunks, batch, frames),
                              lambda: self._assemble(site, q.device, dtype, chunks, batch, frames))
        if rows is None:
            return None
        k, v, scale = rows
        return IPBranch(k, v, scale, self._row_mask(q, extra_options, dtype, frames))

    def _frames(self, extra_options: dict, per_chunk: int) -> Optional[tuple[int, ...]]:
        """The frame of each row within a chunk, for a per-frame K/V provider (None otherwise)."""
        count = getattr(self.kv, "frame_count", None)
        return None if count is None else frame_indices(extra_options, per_chunk, count, self._notices, self.label)

    def _assemble(self, site: Attn2Site, device: torch.device, dtype: torch.dtype, chunks: tuple, batch: int,
                  frames: Optional[tuple[int, ...]] = None):
        """K/V per batch row: chunk c of `cond_or_uncond` is negative when c == 1, positive otherwise."""
        if frames is not None:
            return self.kv.frame_rows(site.index, device, dtype, [c == 1 for c in chunks], frames,
                                      self.swaps[site.index])
        entry = self.kv.get(site.index, device, dtype)
        per_chunk = batch // len(chunks)
        negative = [c == 1 for c in chunks]
        if self.swaps[site.index]:
            # precise modes: negative rows get the image, positive rows nothing
            if not any(negative):
                return None
            scale = torch.tensor([entry.out_scale if n else 0.0 for n in negative], device=device,
                                 dtype=dtype).repeat_interleave(per_chunk)
            return entry.k_cond, entry.v_cond, scale
        k, v = rows_for_chunks((entry.k_cond, entry.v_cond), (entry.k_uncond, entry.v_uncond), chunks, batch)
        return k, v, entry.out_scale

    def _row_mask(self, q: torch.Tensor, extra_options: dict, dtype: torch.dtype,
                  frames: Optional[tuple[int, ...]] = None) -> Optional[torch.Tensor]:
        """The mask on this block's token grid, one row per batch row, in `dtype`; values as given (check_mask
        bounds them once at the node). A mask per latent follows `frames` when the rows are frames."""
        if self.mask is None:
            return None
        grid = _token_grid(q.shape[1], extra_options)
        chunks = len(extra_options.get("cond_or_uncond") or (0,))
        return self._masks.get((grid, q.device, dtype, q.shape[0], chunks, frames),
                               lambda: self._resize_mask(grid, q.device, dtype, q.shape[0] // chunks, chunks, frames))

    def _resize_mask(self, grid: tuple[int, int], device: torch.device, dtype: torch.dtype, per_chunk: int,
                     chunks: int, frames: Optional[tuple[int, ...]] = None) -> torch.Tensor:
        tokens = mask_to_tokens(self.mask.to(device), grid)  # [Bm, Mq]
        if tokens.shape[0] > 1:  # one mask per latent in the batch: trim or repeat the last
            rows = torch.arange(per_chunk) if frames is None else torch.tensor(frames)
            index = rows.to(device).clamp(max=tokens.shape[0] - 1)
            tokens = tokens[index].repeat(chunks, 1)
        return tokens.to(dtype)


def frame_indices(extra_options: dict, per_chunk: int, frame_count: int, notices: set,
                  label: str = "IP-Adapter") -> tuple[int, ...]:
    """Which frame each row of a chunk is: the indices a context-window sampler announces (ComfyUI's
    `transformer_options["context_window"].index_list`; AnimateDiff-Evolved's `ad_params["sub_idxs"]`), else
    the row's position in the batch. Where positions may not be frames (fewer rows than frames and nothing
    announced), or the announced indices do not fit the batch, it says so in the log once per adapter."""
    announced = getattr(extra_options.get("context_window"), "index_list", None)
    if announced is None and isinstance(extra_options.get("ad_params"), dict):
        announced = extra_options["ad_params"].get("sub_idxs")
    if announced is not None and len(announced) == per_chunk:
        return tuple(int(i) for i in announced)
    if announced is not None and "mismatch" not in notices:
        notices.add("mismatch")
        logger.warning("%s (Apply Batch): the sampler announced %d frame indices for a batch of %d latents; using "
                       "each latent's position in the batch as its frame instead", label, len(announced), per_chunk)
    elif announced is None and per_chunk < frame_count and "positions" not in notices:
        notices.add("positions")
        logger.warning("%s (Apply Batch): the sampler passed %d latents without frame indices while the adapter "
                       "has %d frames: latent i gets image and weight i. If this sampler runs the frames in "
                       "context windows without announcing them (ComfyUI's own context windows do), frames are "
                       "misaligned; see the README, 'Apply xformers IP-Adapter Batch'", label, per_chunk,
                       frame_count)
    return tuple(range(per_chunk))


def _token_grid(q_len: int, extra_options: dict) -> tuple[int, int]:
    """The block's h x w token grid from `activations_shape` (any aspect ratio), else from the latent's."""
    shape = extra_options.get("activations_shape")
    if shape is not None and int(shape[-2]) * int(shape[-1]) == q_len:
        return int(shape[-2]), int(shape[-1])
    _, _, height, width = extra_options["original_shape"]
    for factor in (1, 2, 4, 8, 16, 32, 64):
        h, w = -(-int(height) // factor), -(-int(width) // factor)
        if h * w == q_len:
            return h, w
    raise ValueError(f"cannot find the token grid of a block with {q_len} tokens for a "
                     f"{height}x{width} latent")


def moved(applications, wrapped: Optional[Callable], device_or_dtype: Any) -> Optional[Callable]:
    """`model_patches_to` for a patch holding `applications` (and maybe another pack's callable): the adapters
    drop what they cached on other devices; returns the wrapped callable as moved (the same object if unchanged).
    Shared by the attn2 and DiT patches."""
    if not isinstance(device_or_dtype, torch.dtype):
        device = torch.device(device_or_dtype)
        for application in applications:
            application.keep_device(device)
    if wrapped is not None and hasattr(wrapped, "to"):
        return wrapped.to(device_or_dtype)
    return wrapped


@functools.lru_cache(maxsize=32)
def processor_for(config: Optional[AttentionOpConfig]) -> XFormersIPAdapterAttnProcessor:
    """One engine per distinct operator config (its planner keeps the per-signature plans). Bounded: there are
    few configs in a process (12 ops x 2 x 2 x 2 options), and an engine holds only what its callers' cached
    tensors derive, which goes with them."""
    return XFormersIPAdapterAttnProcessor(config)


class IPAdapterAttn2Patch:
    """`replace(q, k, v, extra_options) -> out` for one attn2 site (ComfyUI's attn2 replace contract)."""

    is_xformers_ipadapter_patch = True

    def __init__(self, site: Attn2Site, applications: tuple[AdapterApplication, ...],
                 wrapped: Optional[Callable] = None) -> None:
        self.site = site
        self.applications = applications
        self.wrapped = wrapped

    def with_application(self, application: AdapterApplication) -> "IPAdapterAttn2Patch":
        return IPAdapterAttn2Patch(self.site, self.applications + (application,), self.wrapped)

    def __deepcopy__(self, memo: dict) -> "IPAdapterAttn2Patch":
        # Immutable, so clones share it with its adapters' weights and caches. Those caches follow whichever
        # clone ComfyUI moves or unloads: what one drops, the others rebuild where they next run.
        return self

    def to(self, device_or_dtype: Any) -> "IPAdapterAttn2Patch":
        """ComfyUI's `ModelPatcher.model_patches_to`: the load device then the model dtype when it loads the
        model, the offload device when it unloads it; it stores what this returns. Cached tensors on any other
        device than the one given are dropped, not moved: they are rebuilt cheaply where sampling runs, and a
        copy on the offload device would only take RAM. A dtype changes nothing: the caches are keyed by the
        compute dtype, which is not the model's storage dtype (fp32 attention precision, manual cast)."""
        wrapped = moved(self.applications, self.wrapped, device_or_dtype)
        return self if wrapped is self.wrapped else IPAdapterAttn2Patch(self.site, self.applications, wrapped)

    def config(self, extra_options: dict) -> Optional[AttentionOpConfig]:
        """The newest adapter's explicit operator, else the model's (PatchXformersModelAttention), else auto."""
        for application in reversed(self.applications):
            if application.config is not None:
                return application.config
        return extra_options.get(MODEL_OP_KEY)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
        heads = extra_options["n_heads"]
        precision = get_attn_precision(extra_options.get("attn_precision"), q.dtype)
        compute = torch.float32 if precision == torch.float32 else q.dtype  # cached K/V come in this dtype
        branches = [b for b in (a.branch(self.site, q, extra_options, compute) for a in self.applications)
                    if b is not None]
        config = self.config(extra_options)
        base = self._base(q, k, v, extra_options, config)
        if base is not None and not branches:
            return base
        return processor_for(config)(q, k, v, heads, branches, precision=precision, base=base)

    def _base(self, q, k, v, extra_options: dict, config) -> Optional[torch.Tensor]:
        """The text attention from someone else when it must be theirs: a wrapped replace callable, or a
        model-wide attention override another pack installed (and no operator was chosen here)."""
        if self.wrapped is not None:
            return self.wrapped(q, k, v, extra_options)
        if config is None and "optimized_attention_override" in extra_options:
            from comfy.ldm.modules.attention import optimized_attention

            return optimized_attention(q, k, v, extra_options["n_heads"],
                                       attn_precision=extra_options.get("attn_precision"),
                                       transformer_options=extra_options)
        return None


RELEASE_KEY = "xformers_ipadapter_release_caches"


def applications_in(patcher) -> list[AdapterApplication]:
    """Every adapter applied to this ModelPatcher (once each, in the order the patches hold them)."""
    attn2 = patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    unique: dict[int, AdapterApplication] = {}
    for patch in attn2.values():
        if getattr(patch, "is_xformers_ipadapter_patch", False):
            unique.update((id(a), a) for a in patch.applications)
    return list(unique.values())


def release_caches(patcher, *_: Any) -> None:
    """Free what the patcher's adapters cached: called at the end of every sampling run (ON_CLEANUP) and when
    ComfyUI unloads the model (ON_DETACH). The next run rebuilds K/V once per site, rows and masks once per
    layout: a few small matmuls, against the memory kept across runs otherwise."""
    for application in applications_in(patcher):
        application.release()


def release_caches_with_model(patcher) -> None:
    """Register `release_caches` on the patcher (once; clones inherit ComfyUI callbacks)."""
    for event in (CallbacksMP.ON_CLEANUP, CallbacksMP.ON_DETACH):
        if RELEASE_KEY not in patcher.callbacks.get(event, {}):
            patcher.add_callback_with_key(event, RELEASE_KEY, release_caches)
