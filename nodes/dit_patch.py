"""DiT block patches (Flux, SD3.5): image attention added through the host's own `patches_replace["dit"]` hook.

One `DitBlockPatch` per block key (`("double_block", i)` or `("single_block", i)`). It holds every adapter
applied to the model so far (`DitApplication`s, shared by all blocks) and, when another pack had already
installed a replace at that key, that callable, which it calls instead of the original block. Registered patch
objects are immutable: applying another adapter builds new ones, so upstream models keep their behaviour.

Inside a call the patch copies `transformer_options` and installs an `optimized_attention_override` closure
(chained to any previous override, e.g. Patch Model Attention's) on the copy. The block's joint attention then
goes through the closure, which records the query the block attends with (`BlockCall`) and lets each adapter
add to the attention output (before the block's output projection), and after the block each adapter may add
to the block's output. The block's modules, methods and forward are never touched. See docs/architecture.md
("Flux (and other DiTs)").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
from comfy.patcher_extension import CallbacksMP, WrappersMP

from ..processors.families.dit import LATENT_SHAPE_KEY, DitBlock
from ..processors.families.rope import undo_rope
from .patch import MODEL_OP_KEY, moved

logger = logging.getLogger(__name__)

DIT = "dit"
OVERRIDE = "optimized_attention_override"
RELEASE_KEY = "xformers_ipadapter_release_dit_caches"
LATENT_WRAPPER_KEY = "xformers_ipadapter_latent_shape"


@dataclass(eq=False)
class BlockCall:
    """What one block call's joint attention saw. Built per call, never kept on a patch.

    `q`: the query exactly as the host's attention function got it (Flux: `[B, H, L, D]` after QK-norm and RoPE,
    `skip_reshape=True`; SD3: `[B, L, H*D]`), `heads`, and the block's inputs `args` (img, txt, vec, pe, ...).
    `txt_len`: the number of text tokens at the front of the joint sequence (double blocks: `txt`'s length;
    single blocks: the total minus the image tokens, when the patch knows them)."""

    block: DitBlock
    args: dict
    q: Optional[torch.Tensor] = None
    heads: int = 0
    # the key and value as the host's attention got them (SD3's image attention reuses the block's own k, v)
    k: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None
    skip_reshape: bool = False
    _pre_rope: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def options(self) -> dict:
        return self.args["transformer_options"]

    @property
    def txt_len(self) -> int:
        txt = self.args.get("txt")
        return 0 if txt is None else int(txt.shape[1])

    def query_bhld(self) -> torch.Tensor:
        """The captured query as `[B, H, L, D]`."""
        if self.skip_reshape:
            return self.q
        b, length, inner = self.q.shape
        return self.q.view(b, length, self.heads, inner // self.heads).transpose(1, 2)

    def query_before_rope(self) -> torch.Tensor:
        """`[B, H, L, D]` query before the rotary embedding (the block's `pe`), computed once per call and
        shared by every adapter. Without `pe` (SD3) it is the captured query itself."""
        if self._pre_rope is None:
            q = self.query_bhld()
            pe = self.args.get("pe")
            self._pre_rope = q if pe is None else undo_rope(q, pe)
        return self._pre_rope


class DitApplication(Protocol):
    """One Apply node's adapter as a DiT patch sees it. Read-only after construction except for caches."""

    def blocks(self) -> Sequence[DitBlock]: ...

    def active(self, block: DitBlock, options: dict) -> bool:
        """Adds anything at this block in this step (weight, window); must not sync the host per call."""

    def on_attention(self, call: BlockCall, out: torch.Tensor, config: Any) -> torch.Tensor:
        """The block's attention output (as the host returns it) with this adapter's part added, or `out`."""

    def after_block(self, call: BlockCall, out: dict, config: Any) -> dict:
        """The block's output dict (`img`, and `txt` for double blocks) with this adapter's part added."""

    def release(self) -> None: ...

    def keep_device(self, device: torch.device) -> None: ...

    def models(self) -> list: ...

    config: Any  # its own AttentionOpConfig or None


class DitBlockPatch:
    """`patch(args, extra) -> out` for one DiT block (ComfyUI's dit replace contract)."""

    is_xformers_ipadapter_dit_patch = True

    def __init__(self, block: DitBlock, applications: tuple, wrapped: Optional[Callable] = None) -> None:
        self.block = block
        self.applications = applications
        self.wrapped = wrapped

    def with_application(self, application) -> "DitBlockPatch":
        return DitBlockPatch(self.block, self.applications + (application,), self.wrapped)

    def __deepcopy__(self, memo: dict) -> "DitBlockPatch":
        return self  # immutable: clones share it, its adapters' weights and caches

    def to(self, device_or_dtype: Any) -> "DitBlockPatch":
        """ComfyUI's `model_patches_to`: caches on other devices are dropped (rebuilt where sampling runs); the
        adapter weights themselves move with `models()` (loaded and offloaded by model management)."""
        wrapped = moved(self.applications, self.wrapped, device_or_dtype)
        return self if wrapped is self.wrapped else DitBlockPatch(self.block, self.applications, wrapped)

    def models(self) -> list:
        """ModelPatchers of the adapters' weights (ComfyUI loads them with the model; duplicates collapse)."""
        found = [m for application in self.applications for m in application.models()]
        if self.wrapped is not None and hasattr(self.wrapped, "models"):
            found += self.wrapped.models()
        return found

    def config(self, options: dict) -> Any:
        """The newest adapter's explicit operator, else the model's (Patch Model Attention), else None (auto)."""
        for application in reversed(self.applications):
            if application.config is not None:
                return application.config
        return options.get(MODEL_OP_KEY)

    def __call__(self, args: dict, extra: dict) -> dict:
        options = args["transformer_options"]
        active = tuple(a for a in self.applications if a.active(self.block, options))
        if not active:
            return self._inner(args, extra)
        config = self.config(options)
        call = BlockCall(self.block, args)
        hooked = dict(options)
        hooked[OVERRIDE] = _capturing_override(call, active, config, options.get(OVERRIDE))
        out = self._inner({**args, "transformer_options": hooked}, extra)
        if call.q is None:
            logger.warning("%s %d ran no attention through transformer_options (a replace patch that drops them?): "
                           "the IP-Adapter adds nothing there", self.block.kind, self.block.index)
            return out
        for application in active:
            out = application.after_block(call, out, config)
        return out

    def _inner(self, args: dict, extra: dict) -> dict:
        if self.wrapped is not None:
            return self.wrapped(args, extra)
        return extra["original_block"](args)


def _capturing_override(call: BlockCall, active: tuple, config: Any, previous: Optional[Callable]) -> Callable:
    """The per-call attention override: records the query, runs the attention as it would have run (the previous
    override or the host's function), then lets each adapter add to its output."""

    def override(func, q, k, v, heads, *rest, **kwargs):
        first = call.q is None
        if first:
            call.q, call.heads, call.skip_reshape = q, heads, bool(kwargs.get("skip_reshape", False))
            call.k, call.v = k, v
        out = previous(func, q, k, v, heads, *rest, **kwargs) if previous is not None else \
            func(q, k, v, heads, *rest, **kwargs)
        if not first:  # a block with a second attention call: adapters attach to the first (the joint one)
            return out
        for application in active:
            out = application.on_attention(call, out, config)
        return out

    return override


# ------------------------------------------------------------------------------------------------------------
# Installing, and the caches' lifetime


def install_dit(model, application) -> Any:
    """A clone of `model` with `application` at each of its blocks (existing replaces wrapped, ours extended)."""
    patched = model.clone()
    current = patched.model_options.get("transformer_options", {}).get("patches_replace", {}).get(DIT, {})
    for block in application.blocks():
        existing = current.get(block.key)
        if getattr(existing, "is_xformers_ipadapter_dit_patch", False):
            patch = existing.with_application(application)
        else:
            patch = DitBlockPatch(block, (application,), wrapped=existing)
        patched.set_model_patch_replace(patch, DIT, block.kind, block.index)
    for event in (CallbacksMP.ON_CLEANUP, CallbacksMP.ON_DETACH):
        if RELEASE_KEY not in patched.callbacks.get(event, {}):
            patched.add_callback_with_key(event, RELEASE_KEY, release_dit_caches)
    return patched


def record_latent_shape(model) -> None:
    """Let patches see the latent's shape (`transformer_options[LATENT_SHAPE_KEY]`): masks need the token grid,
    which a DiT block's inputs do not carry. An apply-model wrapper (every model runs those; ComfyUI 0.3.75's SD3
    MMDiT runs no diffusion-model wrappers), registered once per patcher."""
    if LATENT_WRAPPER_KEY in model.wrappers.get(WrappersMP.APPLY_MODEL, {}):
        return
    model.add_wrapper_with_key(WrappersMP.APPLY_MODEL, LATENT_WRAPPER_KEY, _latent_shape_wrapper)


def _latent_shape_wrapper(executor, x, *args, **kwargs):
    options = kwargs.get("transformer_options")
    if options is None:
        options = next((a for a in args if isinstance(a, dict) and "sigmas" in a), None)
    if options is not None:
        options[LATENT_SHAPE_KEY] = tuple(x.shape)
    return executor(x, *args, **kwargs)


def dit_applications_in(patcher) -> list:
    """Every adapter in this patcher's DiT patches (once each)."""
    dit = patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get(DIT, {})
    unique: dict[int, Any] = {}
    for patch in dit.values():
        if getattr(patch, "is_xformers_ipadapter_dit_patch", False):
            unique.update((id(a), a) for a in patch.applications)
    return list(unique.values())


def release_dit_caches(patcher, *_: Any) -> None:
    """End of a sampling run (ON_CLEANUP) or model unloaded (ON_DETACH): free what the adapters cached."""
    for application in dit_applications_in(patcher):
        application.release()
