"""Flux.1 IP-Adapters: XLabs v1/v2 and InstantX, their projections and per-block image attention (pure torch).

Where each adds its image attention (docs/architecture.md, "Flux"; diffusers' `FluxIPAdapterAttnProcessor` and
`FluxTransformerBlock` for XLabs, InstantX's `IPAFluxAttnProcessor2_0` for InstantX):

- XLabs (double blocks only): `img += scale * attn(q_img, k_ip, v_ip)` on the block's image output, after the
  MLP, outside gate and projection. q_img: the image stream's query after QK-norm, before RoPE.
- InstantX (every double and single block): `attn_out += scale * attn(q, rms(k_ip), rms(v_ip))` on the joint
  attention's output before the block's output projection: the image rows in double blocks (q = image query),
  every row in single blocks (q = the whole sequence's query). rms: a weightless RMSNorm over each head's 128
  channels (eps 1e-5), applied once to the cached K/V.

Image K/V are computed once per block, device and dtype per sampling run (bounded `TensorCache`), never per
step; the attention runs on the engine (`XFormersIPAdapterAttnProcessor`, `base=` the host's output), so the
chosen `ATTENTION_OP` applies.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ip_attention import IPBranch, XFormersIPAdapterAttnProcessor
from ..ipadapter.errors import IPAdapterFileError, IPAdapterInputError, IPAdapterMismatchError
from ..ipadapter.kv_cache import rows_for_chunks
from ..step_window import ALWAYS, active_in_window
from ..tensor_cache import TensorCache
from .dit import DOUBLE, DitBlock, block_sequence, latent_grid, mask_rows

logger = logging.getLogger(__name__)

XLABS, INSTANTX = "XLabs", "InstantX"
XLABS_PREFIX = "ip_adapter_proj_model."
XLABS_BLOCK = "double_blocks.{}.processor.ip_adapter_double_stream_{}_proj.{}"
FLUX_HEAD_DIM = 128  # Flux.1's head dim: the width of InstantX's k/v RMSNorms
RMS_EPS = 1e-5
ENCODERS = {XLABS: "CLIP ViT-L/14 image_embeds (768)", INSTANTX: "SigLIP so400m pooled output (1152)"}
# per block: the K/V of one (device, dtype), plus room for a second before the oldest is rebuilt
KV_PER_BLOCK = 2
ROWS_PER_BLOCK = 4  # batch layouts per block (cond+uncond together or apart, a few more with area conds)
MASK_ENTRIES = 16


@dataclass(frozen=True)
class FluxAdapterInfo:
    kind: str  # XLABS or INSTANTX
    tokens: int  # image tokens per reference image
    embed_dim: int  # encoder output width the projection takes
    context_dim: int  # token width (Flux's joint_attention_dim, 4096)
    width: int  # the Flux hidden size the per-block K/V have (3072)
    blocks: int  # per-block K/V pairs: XLabs the double blocks, InstantX doubles + singles

    @property
    def encoder(self) -> str:
        return ENCODERS[self.kind]

    @property
    def includes_singles(self) -> bool:
        return self.kind == INSTANTX

    def describe(self) -> str:
        return (f"Flux.1 {self.kind} IP-Adapter ({self.tokens} tokens, {self.blocks} blocks, width {self.width}; "
                f"fed by {self.encoder})")


class XLabsProjection(nn.Module):
    """`image_embeds` -> tokens: one linear to tokens x context, then a LayerNorm per token."""

    def __init__(self, embed_dim: int, context_dim: int, tokens: int) -> None:
        super().__init__()
        self.tokens, self.context_dim = tokens, context_dim
        self.proj = nn.Linear(embed_dim, context_dim * tokens)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return _tokens_norm(self.norm, _linear(self.proj, embeds), self.tokens, self.context_dim)


class InstantXProjection(nn.Module):
    """pooled embedding -> tokens: Linear, GELU, Linear to tokens x context, then a LayerNorm per token."""

    def __init__(self, embed_dim: int, hidden: int, context_dim: int, tokens: int) -> None:
        super().__init__()
        self.tokens, self.context_dim = tokens, context_dim
        self.proj = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, context_dim * tokens))
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        hidden = F.gelu(_linear(self.proj[0], embeds))
        return _tokens_norm(self.norm, _linear(self.proj[2], hidden), self.tokens, self.context_dim)


def _linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A linear in float32 result, computed in the weights' stored dtype (InstantX's 2.4 GB projection is not
    copied to float32 for one matmul)."""
    weight = layer.weight
    bias = None if layer.bias is None else layer.bias.to(weight.dtype)
    return F.linear(x.to(weight.device, weight.dtype), weight, bias).float()


def _tokens_norm(norm: nn.LayerNorm, x: torch.Tensor, tokens: int, width: int) -> torch.Tensor:
    x = x.reshape(x.shape[0], tokens, width)
    return F.layer_norm(x, (width,), norm.weight.float().to(x.device), norm.bias.float().to(x.device), norm.eps)


def rms_heads(x: torch.Tensor, head_dim: int, eps: float = RMS_EPS) -> torch.Tensor:
    """A weightless RMSNorm over each head's channels of `[..., H*head_dim]` (float32)."""
    heads = x.reshape(*x.shape[:-1], -1, head_dim).float()
    heads = heads * torch.rsqrt(heads.pow(2).mean(-1, keepdim=True) + eps)
    return heads.reshape(x.shape)


class FluxIPAdapterModel(nn.Module):
    """A Flux IP-Adapter's weights: the projection and one K/V linear pair per block (stored dtype, no copies)."""

    def __init__(self, info: FluxAdapterInfo, projection: nn.Module, to_k: Sequence[nn.Linear],
                 to_v: Sequence[nn.Linear], name: str = "Flux IP-Adapter") -> None:
        super().__init__()
        self.info, self.name = info, name
        self.projection = projection
        self.to_k = nn.ModuleList(to_k)
        self.to_v = nn.ModuleList(to_v)
        self.host_handle: Any = None  # a slot for the host's handle on these weights (ComfyUI: its ModelPatcher)

    def describe(self) -> str:
        return f"{self.name}: {self.info.describe()}"

    @torch.no_grad()
    def project(self, embeds: torch.Tensor) -> torch.Tensor:
        """`[N, embed_dim]` -> `[N, tokens, context_dim]` float32."""
        if embeds.ndim != 2 or embeds.shape[-1] != self.info.embed_dim:
            raise IPAdapterMismatchError(
                f"this {self.info.kind} Flux IP-Adapter expects {self.info.encoder}, one {self.info.embed_dim}-wide "
                f"vector per image; got embeddings of shape {tuple(embeds.shape)}")
        return self.projection(embeds.float())

    @torch.no_grad()
    def block_kv(self, index: int, tokens: torch.Tensor, device: torch.device, dtype: torch.dtype,
                 head_dim: int = FLUX_HEAD_DIM) -> tuple[torch.Tensor, torch.Tensor]:
        """Block `index`'s image K/V `[1, T, width]` for `tokens` `[1, T, context]`, computed in float32.
        `head_dim`: the model's (InstantX normalises K and V per head)."""
        # computed where the weights are (ComfyUI may keep them offloaded), then moved to the sampling device
        k, v = (_linear(layer[index], tokens) for layer in (self.to_k, self.to_v))
        if self.info.kind == INSTANTX:
            k, v = rms_heads(k, head_dim), rms_heads(v, head_dim)
        return k.to(device, dtype), v.to(device, dtype)


# --------------------------------------------------------------------------------------------------------------
# Reading files (registered in processors/ipadapter/families.py READERS)


def _nested(tensors: Mapping[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    """{"image_proj": {...}, "ip_adapter": {...}} from a nested (.bin) or flat-prefix layout."""
    if isinstance(tensors.get("image_proj"), Mapping):
        return {part: dict(tensors.get(part, {})) for part in ("image_proj", "ip_adapter")}
    out: dict[str, dict[str, torch.Tensor]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in tensors.items():
        part, _, rest = key.partition(".")
        if part in out and rest:
            out[part][rest] = value
    return out


def _linears(weights: Sequence[torch.Tensor], biases: Sequence[Optional[torch.Tensor]], what: str) -> list[nn.Linear]:
    out = []
    for i, (weight, bias) in enumerate(zip(weights, biases)):
        if weight.shape != weights[0].shape:
            raise IPAdapterFileError(f"{what} of block {i} has shape {tuple(weight.shape)}, block 0 has "
                                     f"{tuple(weights[0].shape)}")
        with torch.device("meta"):
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        state = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        layer.load_state_dict(state, strict=True, assign=True)
        out.append(layer.requires_grad_(False))
    return out


def _assign(module: nn.Module, state: Mapping[str, torch.Tensor], what: str) -> nn.Module:
    try:
        module.load_state_dict(dict(state), strict=True, assign=True)
    except RuntimeError as exc:
        raise IPAdapterFileError(f"{what} weights do not match their layout: {exc}") from exc
    return module.requires_grad_(False)


def _count(keys: Sequence[str], pattern: str) -> int:
    n = 0
    while pattern.format(n) in keys:
        n += 1
    return n


def read_xlabs(tensors: Mapping[str, Any], name: str) -> Optional[FluxIPAdapterModel]:
    keys = set(tensors)
    if XLABS_PREFIX + "proj.weight" not in keys:
        return None
    blocks = _count(keys, XLABS_BLOCK.format("{}", "k", "weight"))
    if blocks == 0:
        raise IPAdapterFileError(f"{name}: an XLabs Flux IP-Adapter projection without any "
                                 f"double_blocks.N.processor.ip_adapter_double_stream_k_proj weights")
    proj = tensors[XLABS_PREFIX + "proj.weight"]
    context = tensors[XLABS_PREFIX + "norm.weight"].shape[0]
    if proj.shape[0] % context:
        raise IPAdapterFileError(f"{name}: projection rows {proj.shape[0]} are not a multiple of the token width "
                                 f"{context}")
    tokens = proj.shape[0] // context
    with torch.device("meta"):
        projection = XLabsProjection(proj.shape[1], context, tokens)
    projection = _assign(projection, {k[len(XLABS_PREFIX):]: v for k, v in tensors.items()
                                      if k.startswith(XLABS_PREFIX)}, f"{name} projection")
    per = {kind: [tensors[XLABS_BLOCK.format(i, kind, "weight")] for i in range(blocks)] for kind in "kv"}
    bias = {kind: [tensors.get(XLABS_BLOCK.format(i, kind, "bias")) for i in range(blocks)] for kind in "kv"}
    to_k, to_v = (_linears(per[kind], bias[kind], f"{name} to_{kind}") for kind in "kv")
    if to_k[0].in_features != context:
        raise IPAdapterFileError(f"{name}: block K/V take {to_k[0].in_features}-wide tokens, the projection makes "
                                 f"{context}")
    info = FluxAdapterInfo(XLABS, tokens, proj.shape[1], context, to_k[0].out_features, blocks)
    return FluxIPAdapterModel(info, projection, to_k, to_v, name)


def read_instantx(tensors: Mapping[str, Any], name: str) -> Optional[FluxIPAdapterModel]:
    nested = _nested(tensors)
    proj, ip = nested["image_proj"], nested["ip_adapter"]
    if "proj.0.weight" not in proj or "proj.2.weight" not in proj or "0.to_k_ip.weight" not in ip:
        return None  # SD adapters number their sites 1, 3, 5, ...: block 0 is InstantX Flux's
    blocks = _count(set(ip), "{}.to_k_ip.weight")
    context = proj["norm.weight"].shape[0]
    hidden, embed = proj["proj.0.weight"].shape
    rows = proj["proj.2.weight"].shape[0]
    if rows % context:
        raise IPAdapterFileError(f"{name}: projection rows {rows} are not a multiple of the token width {context}")
    with torch.device("meta"):
        projection = InstantXProjection(embed, hidden, context, rows // context)
    projection = _assign(projection, proj, f"{name} image_proj")
    to_k, to_v = (_linears([ip[f"{i}.to_{kind}_ip.weight"] for i in range(blocks)], [None] * blocks,
                           f"{name} to_{kind}_ip") for kind in "kv")
    info = FluxAdapterInfo(INSTANTX, rows // context, embed, context, to_k[0].out_features, blocks)
    return FluxIPAdapterModel(info, projection, to_k, to_v, name)


def read_flux_adapter(tensors: Mapping[str, Any], name: str) -> Optional[FluxIPAdapterModel]:
    """A Flux IP-Adapter when the keys and shapes are one (XLabs or InstantX), else None."""
    return read_xlabs(tensors, name) or read_instantx(tensors, name)


# --------------------------------------------------------------------------------------------------------------
# Validation against the model and the encoder


@dataclass(frozen=True)
class FluxGeometry:
    """What the adapter must fit in the diffusion model."""

    width: int
    heads: int
    doubles: int
    singles: int
    patch_size: int = 2


def check_fits(info: FluxAdapterInfo, model: Optional[FluxGeometry], model_name: str) -> None:
    """Refuse a Flux adapter on a non-Flux model or on a Flux of another width/depth, naming both sides."""
    if model is None:
        raise IPAdapterMismatchError(
            f"this is a Flux.1 IP-Adapter ({info.kind}, width {info.width}); the model is {model_name}, not Flux. "
            f"Use it with a Flux.1 model (e.g. flux1-dev.safetensors).")
    if model.width != info.width:
        raise IPAdapterMismatchError(
            f"this Flux.1 {info.kind} IP-Adapter attends at width {info.width}; the Flux model's hidden size is "
            f"{model.width}. Use an adapter made for this model.")
    needed = model.doubles + (model.singles if info.includes_singles else 0)
    if info.blocks != needed:
        where = "double + single" if info.includes_singles else "double"
        raise IPAdapterMismatchError(
            f"this Flux.1 {info.kind} IP-Adapter has K/V for {info.blocks} blocks; the model has {needed} {where} "
            f"blocks ({model.doubles} double, {model.singles} single)")


def encoder_error(info: FluxAdapterInfo, got: int, got_name: str) -> IPAdapterMismatchError:
    return IPAdapterMismatchError(
        f"this Flux.1 {info.kind} IP-Adapter expects {info.encoder}; the CLIP vision model gives {got}-wide "
        f"{got_name}. Load the matching CLIP vision model (XLabs: clip_vision_l.safetensors, CLIP ViT-L/14; "
        f"InstantX: SigLIP so400m patch14-384 with its pooling head).")


# --------------------------------------------------------------------------------------------------------------
# One Apply node's adapter on a Flux model (a DitApplication for nodes/dit_patch.py)


def _kv_cache_size(blocks: int) -> int:
    return KV_PER_BLOCK * blocks


@functools.lru_cache(maxsize=32)
def cached_engine(config: Any) -> XFormersIPAdapterAttnProcessor:
    """One engine per operator config (its planner caches plans per signature); hosts may pass their own."""
    return XFormersIPAdapterAttnProcessor(config)


@dataclass(eq=False)
class FluxApplication:
    """Tokens, per-block weights, window, mask and operator of one Apply node. Read-only after construction except
    for its caches (K/V per block, K/V rows per batch layout, masks per grid), shared by clones on purpose.

    cond/uncond: `[1, N*T, context]` float32 tokens (several images side by side along the token axis)."""

    model: FluxIPAdapterModel
    cond: torch.Tensor
    uncond: torch.Tensor
    geometry: FluxGeometry
    weights: tuple[float, ...]  # per position in `blocks()`
    sigma_window: tuple[float, float] = ALWAYS
    mask: Optional[torch.Tensor] = None  # [Bm, H, W]
    config: Any = None
    engine_for: Callable[[Any], XFormersIPAdapterAttnProcessor] = field(default=None, repr=False)
    patcher: Any = None  # the ModelPatcher that moves the adapter's weights (ComfyUI model management)
    _kv: TensorCache = field(init=False, repr=False)
    _rows: TensorCache = field(init=False, repr=False)
    _masks: TensorCache = field(init=False, repr=False)
    _step: list = field(default_factory=lambda: [None, True], repr=False)

    def __post_init__(self) -> None:
        count = len(self.weights)
        self._kv = TensorCache("Flux image K/V", _kv_cache_size(count))
        self._rows = TensorCache("Flux K/V rows", ROWS_PER_BLOCK * count)
        self._masks = TensorCache("Flux masks", MASK_ENTRIES)
        if self.engine_for is None:
            self.engine_for = cached_engine
        if not all(math.isfinite(w) for w in self.weights):
            raise IPAdapterInputError("IP-Adapter weights must be finite numbers")

    def __deepcopy__(self, memo: dict) -> "FluxApplication":
        return self

    def blocks(self) -> tuple[DitBlock, ...]:
        g = self.geometry
        return block_sequence(g.doubles, g.singles if self.model.info.includes_singles else 0)

    def models(self) -> list:
        return [] if self.patcher is None else [self.patcher]

    def release(self) -> None:
        for cache in (self._kv, self._rows, self._masks):
            cache.clear()
        self._step[:] = [None, True]

    def keep_device(self, device: torch.device) -> None:
        for cache in (self._kv, self._rows, self._masks):
            cache.keep_device(device)
        self._step[:] = [None, True]

    def active(self, block: DitBlock, options: dict) -> bool:
        return self.weights[block.position] != 0.0 and active_in_window(self.sigma_window, self._step, options)

    # -- the two places an adapter adds its attention -----------------------------------------------------------

    def on_attention(self, call, out: torch.Tensor, config: Any) -> torch.Tensor:
        """InstantX: add to the joint attention's output (`[B, L, H*D]`) before the block's projection."""
        if self.model.info.kind != INSTANTX:
            return out
        double = call.block.kind == DOUBLE
        lead = call.txt_len if double else 0
        q = call.query_before_rope()[:, :, lead:]  # [B, H, Lq, D]
        base = out[:, lead:] if double else out
        added = self._attend(call, q, base, config, lead_in_mask=0 if double else self._txt_len(call, q))
        return torch.cat([out[:, :lead], added], dim=1) if double else added

    def after_block(self, call, out: dict, config: Any) -> dict:
        """XLabs: add to the double block's image output, after the MLP, outside gate and projection."""
        if self.model.info.kind != XLABS:
            return out
        q = call.query_before_rope()[:, :, call.txt_len:]
        return {**out, "img": self._attend(call, q, out["img"], config, lead_in_mask=0)}

    def _txt_len(self, call, q: torch.Tensor) -> int:
        """Text tokens at the front of a single block's sequence: all minus the image tokens (from the latent's
        grid when known; only masks need it)."""
        grid = latent_grid(call.options, self.geometry.patch_size)
        return 0 if grid is None else max(0, q.shape[2] - grid[0] * grid[1])

    def _attend(self, call, q: torch.Tensor, base: torch.Tensor, config: Any, lead_in_mask: int) -> torch.Tensor:
        batch, heads, length, dim = q.shape
        options = call.options
        chunks = tuple(options.get("cond_or_uncond") or (0,))
        dtype = base.dtype
        k, v = self._rows.get((call.block.position, q.device, dtype, chunks, batch),
                              lambda: self._assemble(call.block.position, q.device, dtype, chunks, batch))
        mask = self._row_mask(options, batch, length, lead_in_mask, len(chunks), q.device, dtype)
        branch = IPBranch(k, v, self.weights[call.block.position], mask)
        q3 = q.transpose(1, 2).reshape(batch, length, heads * dim).to(dtype)
        return self.engine_for(config)(q3, None, None, heads, (branch,), base=base)

    def _block_kv(self, position: int, device: torch.device, dtype: torch.dtype):
        def build():
            head_dim = self.geometry.width // self.geometry.heads
            return (self.model.block_kv(position, self.cond, device, dtype, head_dim),
                    self.model.block_kv(position, self.uncond, device, dtype, head_dim))
        return self._kv.get((position, device, dtype), build)

    def _assemble(self, position: int, device: torch.device, dtype: torch.dtype, chunks: tuple, batch: int):
        """K/V per batch row: chunk c of `cond_or_uncond` gets the negative image's K/V when c == 1."""
        cond, uncond = self._block_kv(position, device, dtype)
        return rows_for_chunks(cond, uncond, chunks, batch)

    def _row_mask(self, options: dict, batch: int, length: int, lead: int, chunks: int, device: torch.device,
                  dtype: torch.dtype) -> Optional[torch.Tensor]:
        if self.mask is None:
            return None
        grid = latent_grid(options, self.geometry.patch_size)
        if grid is None:
            raise IPAdapterInputError("attn_mask on a Flux model needs the latent's shape; the model's wrapper that "
                                      "records it did not run (was the model patched by another node after Apply?)")
        return self._masks.get((grid, length, lead, batch, chunks, device, dtype),
                               lambda: mask_rows(self.mask.to(device), grid, batch, lead, length, chunks).to(dtype))


def tokens_for(model: FluxIPAdapterModel, embeds: torch.Tensor) -> torch.Tensor:
    """Project `[N, E]` embeddings and lay the N images' tokens side by side: `[1, N*T, context]`."""
    tokens = model.project(embeds)
    return tokens.reshape(1, -1, tokens.shape[-1])
