"""SD3.5 InstantX IP-Adapter in ComfyUI: Apply and Apply Embeds for `SD3IPAdapter`, through the dit patches.

Each joint block i of ComfyUI's MMDiT is reached through `patches_replace["dit"][("double_block", i)]`
(nodes/dit_patch.py). In the block's joint attention (the attention override the patch installs for that call)
the application takes the image stream's q, k, v as the host's attention got them (text tokens first, q/k
through the block's own RMSNorm), runs the adapter's image attention on the engine and adds `weight x mask x`
it to the image part of the attention output, before the block's output projection: where diffusers'
`SD3IPAdapterJointAttnProcessor2_0` adds it. The resampler runs once per model call (once per step), kept for
the sigmas tensor the host passes to every block of that call. The maths: processors/families/sd3.py.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import comfy.model_management
import torch

from ..processors import planner
from ..processors.backends import AttentionOpConfig
from ..processors.families.dit import DOUBLE, DitBlock, latent_grid, mask_rows, match_count, sequence_weights
from ..processors.families.sd3 import (ENCODER_OUTPUT, JointBranch, SD3IPAdapter, StepTokens, block_image_kv,
                                       joint_image_attention, renorm_obstacle)
from ..processors.ipadapter.embeds import AdapterEmbeds, mask_clip_input, weighted
from ..processors.ipadapter.errors import IPAdapterInputError, IPAdapterMismatchError
from ..processors.ipadapter.tokens import check_combine, combine_embeddings
from ..processors.ipadapter.validation import check_image_batch
from ..processors.masks import check_mask
from ..processors.step_window import active_in_window
from ..processors.tensor_cache import TensorCache
from .apply import _sigma_window
from .dit_patch import BlockCall, install_dit, record_latent_shape
from .flux import adapter_patcher
from .patch import processor_for
from .planning import compute_dtype, start_run_log

logger = logging.getLogger(__name__)

# the adapter's keys go through its own RMSNorm, so scaling them (K+V variants) would change nothing there
SD3_EMBEDS_SCALING = ("V only",)
ENCODER_HINT = "SigLIP so400m patch14-384 (siglip_vision_patch14_384.safetensors)"
MODEL_HINT = "SD3.5 Large (sd3.5_large.safetensors)"
SIGLIP_MEAN = (0.5, 0.5, 0.5)  # SigLIP's normalisation mean: what a masked-out pixel becomes
MASK_LAYOUTS = 8  # (token grid, batch layout) pairs a run meets: one latent size, cond/uncond together or apart


# --------------------------------------------------------------------------------------------------------------
# The model's side: its joint blocks' q/k norms


@dataclass(frozen=True)
class HostNorms:
    """Each joint block's image-stream q/k norm modules (None: the block has none). Read at call time: ComfyUI
    may swap a module's parameter object (weight patches, casts) but not the module."""

    modules: tuple[tuple[Optional[torch.nn.Module], Optional[torch.nn.Module]], ...]
    patch_size: int

    def weights(self, index: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        q_norm, k_norm = self.modules[index]
        return (None if q_norm is None else q_norm.weight), (None if k_norm is None else k_norm.weight)


def host_norms(model, adapter: SD3IPAdapter) -> HostNorms:
    """The model's joint blocks checked against the adapter (family, width, depth, q/k norms); errors name both."""
    info = adapter.info
    diffusion = model.get_model_object("diffusion_model")
    blocks = getattr(diffusion, "joint_blocks", None)
    if blocks is None:
        raise IPAdapterMismatchError(
            f"{adapter.name} is an SD3.5 IP-Adapter ({info.describe()}), but the model is "
            f"{type(model.model).__name__}, not an SD3 MMDiT: load {MODEL_HINT} for this adapter, or the adapter "
            f"made for your model")
    attn = blocks[0].x_block.attn
    width, heads = attn.qkv.in_features, attn.num_heads
    if (width, len(blocks), width // heads) != (info.hidden, info.blocks, info.head_dim):
        raise IPAdapterMismatchError(
            f"{adapter.name} fits an SD3 model {info.hidden} wide ({info.heads} heads x {info.head_dim}) with "
            f"{info.blocks} joint blocks (SD3.5 Large); this model is {width} wide ({heads} heads x "
            f"{width // heads}) with {len(blocks)} joint blocks: load {MODEL_HINT}")
    return HostNorms(tuple(_block_norms(block, i) for i, block in enumerate(blocks)), int(diffusion.patch_size))


def _block_norms(block, index: int) -> tuple[Optional[torch.nn.Module], Optional[torch.nn.Module]]:
    if getattr(block.x_block, "x_block_self_attn", False):
        raise IPAdapterMismatchError(f"joint block {index} of this model has a second image self-attention "
                                     f"(SD3.5 Medium, MMDiT-X); the InstantX adapter is for {MODEL_HINT}")
    norms = []
    for name in ("ln_q", "ln_k"):
        module = getattr(block.x_block.attn, name)
        if isinstance(module, torch.nn.Identity):
            norms.append(None)
            continue
        if type(module).__name__ != "RMSNorm" or getattr(module, "weight", None) is None:
            raise IPAdapterMismatchError(f"joint block {index}'s {name} is a {type(module).__name__}; the adapter "
                                         f"can only reuse an RMSNorm'd (or raw) query and key ({MODEL_HINT})")
        obstacle = renorm_obstacle(module.weight)
        if obstacle:
            raise IPAdapterMismatchError(f"joint block {index}'s {name}: {obstacle}, so the adapter's own "
                                         f"normalisation of the raw {name[-1]} cannot be recovered")
        norms.append(module)
    return norms[0], norms[1]


# --------------------------------------------------------------------------------------------------------------
# One Apply node's adapter


@dataclass(eq=False)
class SD3Application:
    """A `DitApplication` (nodes/dit_patch.py): read-only after construction except for caches (the step's
    resampler output, resized masks, the step's window decision), which depend only on inputs."""

    adapter: SD3IPAdapter
    tokens: StepTokens
    block_weights: tuple[float, ...]
    norms: HostNorms
    timestep: Callable[[torch.Tensor], torch.Tensor]  # sigma -> the model's timestep (SD3: sigma x 1000)
    weights_patcher: Any  # ModelPatcher of the adapter's weights: loaded and offloaded with the model
    sigma_window: tuple[float, float]
    mask: Optional[torch.Tensor] = None
    config: Optional[AttentionOpConfig] = None
    _step: list = field(default_factory=lambda: [None, True], repr=False)
    _masks: TensorCache = field(default_factory=lambda: TensorCache("SD3 masks", MASK_LAYOUTS), repr=False)

    def __deepcopy__(self, memo: dict) -> "SD3Application":
        return self

    def blocks(self) -> list[DitBlock]:
        """The joint blocks with a non-zero weight (the others get no patch at all)."""
        total = len(self.block_weights)
        return [DitBlock(DOUBLE, i, i, total) for i, w in enumerate(self.block_weights) if w != 0.0]

    def active(self, block: DitBlock, options: dict) -> bool:
        return active_in_window(self.sigma_window, self._step, options)

    def on_attention(self, call: BlockCall, out: torch.Tensor, config: Any) -> torch.Tensor:
        if call.skip_reshape or out.dim() != 3:
            logger.warning("joint block %d: attention in a layout the SD3 adapter does not know; skipped",
                           call.block.index)
            return out
        index, length, batch = call.block.index, call.txt_len, out.shape[0]
        options = call.options
        chunks = tuple(options.get("cond_or_uncond") or (0,))
        negative_rows = tuple(c == 1 for c in chunks for _ in range(batch // len(chunks)))
        tokens, temb = self.tokens.rows(self.adapter.image_proj, options["sigmas"], self.timestep, negative_rows,
                                        call.q.dtype)
        block = self.adapter.ip_adapter[index]
        k, v = block_image_kv(block, tokens, temb, self.adapter.info.head_dim)
        image_q = call.q[:, length:]
        branch = JointBranch(k, v, block.norm_q.weight, block.norm_k.weight, self.block_weights[index],
                             self._row_mask(image_q, options, len(chunks)))
        added = joint_image_attention(image_q, call.k[:, length:], call.v[:, length:], call.heads, [branch],
                                      processor_for(config).planner.attention, *self.norms.weights(index))
        out[:, length:] += added.to(out.dtype)
        return out

    def after_block(self, call: BlockCall, out: dict, config: Any) -> dict:
        return out

    def _row_mask(self, image_q: torch.Tensor, options: dict, chunks: int) -> Optional[torch.Tensor]:
        """The mask on the latent's token grid, one row per batch row, cached per grid and layout."""
        if self.mask is None:
            return None
        grid = latent_grid(options, self.norms.patch_size)
        if grid is None or grid[0] * grid[1] != image_q.shape[1]:
            raise RuntimeError(f"attn_mask: the latent's token grid ({grid}) does not give the block's "
                               f"{image_q.shape[1]} image tokens")
        batch, length = image_q.shape[0], image_q.shape[1]
        key = (grid, image_q.device, image_q.dtype, batch, chunks)
        return self._masks.get(key, lambda: mask_rows(self.mask.to(image_q.device), grid, batch, 0, length,
                                                      chunks).to(image_q.dtype))

    def release(self) -> None:
        self.tokens.release()
        self._masks.clear()
        self._step[:] = [None, True]

    def keep_device(self, device: torch.device) -> None:
        self.tokens.release()  # per step anyway: the next call recomputes where it runs
        self._masks.keep_device(device)
        self._step[:] = [None, True]

    def models(self) -> list:
        return [self.weights_patcher]


# --------------------------------------------------------------------------------------------------------------
# Apply and Apply Embeds


@dataclass(frozen=True)
class SD3Target:
    model: Any
    adapter: SD3IPAdapter
    norms: HostNorms
    weights: tuple[float, ...]
    window: tuple[float, float]
    mask: Optional[torch.Tensor]
    config: Optional[AttentionOpConfig]


def prepare_sd3(model, ipadapter: SD3IPAdapter, weight: float, weight_type: str, start_at: float, end_at: float,
                embeds_scaling: str, attention_op, attn_mask, layer_weights: str) -> SD3Target:
    """Every check before any image is encoded: scalars, choices that mean something for SD3, the model."""
    if not math.isfinite(weight):
        raise IPAdapterInputError(f"weight must be a finite number; got {weight}")
    if not (0.0 <= start_at <= end_at <= 1.0):
        raise IPAdapterInputError(f"start_at and end_at must satisfy 0 <= start_at <= end_at <= 1; got "
                                  f"{start_at}, {end_at}")
    if embeds_scaling not in SD3_EMBEDS_SCALING:
        raise IPAdapterInputError(f"embeds_scaling {embeds_scaling!r} has no meaning for an SD3.5 adapter (its image "
                                  f"keys are RMS-normalised); choose {', '.join(SD3_EMBEDS_SCALING)}")
    if attention_op is not None and not isinstance(attention_op, AttentionOpConfig):
        raise IPAdapterInputError("attention_op must come from Select Attention Op")
    norms = host_norms(model, ipadapter)
    # the curves over the joint blocks (the UNet-only types refused with the list), or layer_weights over them
    weights = sequence_weights(weight_type, weight, ipadapter.info.blocks, layer_weights, "SD3.5")
    mask = check_mask(attn_mask) if attn_mask is not None else None
    if attention_op is not None:
        planner.check_model(attention_op, comfy.model_management.get_torch_device(), compute_dtype(model),
                            [(ipadapter.info.heads, ipadapter.info.head_dim)], adapters=0)
    return SD3Target(model, ipadapter, norms, weights, _sigma_window(model, start_at, end_at), mask, attention_op)


def install_sd3(target: SD3Target, positive: torch.Tensor, negative: torch.Tensor):
    """One application on a clone of the target's model (the input model is untouched)."""
    model = target.model
    application = SD3Application(
        adapter=target.adapter, tokens=StepTokens(positive, negative), block_weights=target.weights,
        norms=target.norms, timestep=model.get_model_object("model_sampling").timestep,
        weights_patcher=adapter_patcher(target.adapter),
        sigma_window=target.window, mask=target.mask, config=target.config)
    patched = install_dit(model, application)
    if target.mask is not None:
        record_latent_shape(patched)
    start_run_log(patched)
    logger.info("applied %s at %d joint blocks (%d reference image(s))", target.adapter.describe(),
                len(application.blocks()), positive.shape[0])
    return patched


def _hidden_states(clip_vision, image: torch.Tensor, adapter: SD3IPAdapter, label: str,
                   mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    image = check_image_batch(image, label)
    if mask is not None:
        image = mask_clip_input(image, mask, SIGLIP_MEAN)
    output = clip_vision.encode_image(image)
    hidden = getattr(output, ENCODER_OUTPUT, None)
    if hidden is None or hidden.dim() != 3:
        raise IPAdapterMismatchError(f"clip_vision gives no {ENCODER_OUTPUT}; {adapter.name} needs {ENCODER_HINT}")
    _check_width(int(hidden.shape[-1]), adapter, "clip_vision")
    return hidden.float().cpu()


def _check_width(width: int, adapter: SD3IPAdapter, label: str) -> None:
    if width != adapter.info.encoder_width:
        raise IPAdapterMismatchError(
            f"{label} gives {width}-wide {ENCODER_OUTPUT}; {adapter.name} needs {adapter.info.encoder_width}-wide "
            f"ones from {ENCODER_HINT}")


def apply_sd3(model, ipadapter, clip_vision, image, weight, weight_type, start_at, end_at, combine_embeds,
              embeds_scaling, attention_op=None, attn_mask=None, image_negative=None, layer_weights="", **_):
    """Apply xformers IP-Adapter Attention with an SD3.5 adapter (the handler in nodes/families.py)."""
    target = prepare_sd3(model, ipadapter, weight, weight_type, start_at, end_at, embeds_scaling, attention_op,
                         attn_mask, layer_weights)
    check_combine(combine_embeds)
    positive = combine_embeddings(_hidden_states(clip_vision, image, ipadapter, "image"), combine_embeds)
    if image_negative is None:
        negative = torch.zeros_like(positive)  # diffusers' negative: zero hidden states through the resampler
    else:
        negative = combine_embeddings(_hidden_states(clip_vision, image_negative, ipadapter, "image_negative"),
                                      combine_embeds)
    return install_sd3(target, positive, match_count(negative, positive.shape[0]))


def _embeds_tensor(embeds, adapter: SD3IPAdapter, label: str) -> torch.Tensor:
    if not isinstance(embeds, AdapterEmbeds):
        raise IPAdapterInputError(f"{label} must come from IP-Adapter Encoder, Combine Embeds or Load Embeds "
                                  f"(xformers); got {type(embeds).__name__}")
    if embeds.clip_output != ENCODER_OUTPUT:
        raise IPAdapterMismatchError(f"{label} hold {embeds.clip_output}; {adapter.name} needs {ENCODER_OUTPUT} "
                                     f"of {ENCODER_HINT}")
    _check_width(embeds.width, adapter, label)
    return embeds.tensor


def apply_sd3_embeds(model, ipadapter, pos_embeds, weight, weight_type, start_at, end_at, embeds_scaling,
                     neg_embeds=None, attention_op=None, attn_mask=None, layer_weights="", **_):
    """Apply xformers IP-Adapter Embeds with an SD3.5 adapter (the handler in nodes/families.py)."""
    target = prepare_sd3(model, ipadapter, weight, weight_type, start_at, end_at, embeds_scaling, attention_op,
                         attn_mask, layer_weights)
    positive = _embeds_tensor(pos_embeds, ipadapter, "pos_embeds")
    negative = torch.zeros_like(positive) if neg_embeds is None else _embeds_tensor(neg_embeds, ipadapter, "neg_embeds")
    return install_sd3(target, positive, match_count(negative, positive.shape[0]))


def encode_sd3(ipadapter, clip_vision, image, weight, mask=None, image_negative=None, **_):
    """IP-Adapter Encoder with an SD3.5 adapter (the handler in nodes/families.py): SigLIP penultimate hidden
    states, positive times weight; negative: the negative image's, else zeros (diffusers' negative)."""
    positive = _hidden_states(clip_vision, image, ipadapter, "image", mask)
    if image_negative is None:
        negative = torch.zeros_like(positive[:1])
    else:
        negative = _hidden_states(clip_vision, image_negative, ipadapter, "image_negative")
    source = ipadapter.info.describe()
    return (weighted(AdapterEmbeds(positive, ENCODER_OUTPUT, source), weight),
            AdapterEmbeds(negative, ENCODER_OUTPUT, source))


# nodes/families.py registers these: adapter class -> handler
SD3_APPLY = {SD3IPAdapter: apply_sd3}
SD3_EMBEDS = {SD3IPAdapter: apply_sd3_embeds}
SD3_ENCODER = {SD3IPAdapter: encode_sd3}
