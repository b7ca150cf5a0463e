"""SD3.5 Large InstantX IP-Adapter: its model, the timestep-conditioned resampler and the joint-block image
attention, pure torch (docs/families.md, "SD3.5").

What the adapter computes (the maths of diffusers' `IPAdapterTimeImageProjection` and
`SD3IPAdapterJointAttnProcessor2_0`, re-derived and written here):

- once per step: `tokens, temb = resampler(siglip_hidden_states, timestep)`; a perceiver over the SigLIP
  penultimate hidden states whose 64 queries and layer norms are modulated by the timestep embedding (adaLN);
- per joint block i: `ip = norm_ip_i(tokens, temb)` (LayerNorm, shift/scale from temb), `ip_k = rms_i(to_k_ip_i(ip))`,
  `ip_v = to_v_ip_i(ip)`, and for the image stream's raw projections q, k, v:

      image_out += scale * attention(rms_q_i(q), cat(rms_k_i(k), ip_k), cat(v, ip_v))

  one softmax over the image keys and the adapter's keys together: unlike the attn2 adapters it is not a sum of
  separate attentions, so it runs on the engine as one attention of the image queries over concatenated keys
  (`Planner.attention`, ATTENTION_OP honoured).

The host (ComfyUI's MMDiT) hands the attention its queries and keys already through the block's own RMSNorm
(`ln_q`/`ln_k`), while the adapter normalises the raw projections with its own weights. RMSNorm's output is
`x / rms(x) * w`, so the adapter's `x / rms(x) * w_ip` is `host_output * (w_ip / w)`: exact, one multiply, as
long as the host's weight has no zero (checked at apply: `renorm_obstacle`). A host block without q/k norm
passes raw projections; then the adapter's RMSNorm runs as is.

Parameter names are InstantX's own (`image_proj.layers.{i}.0.to_kv`, `ip_adapter.{i}.norm_ip.linear`), so a
release file loads strictly with no renaming; diffusers renames them (loaders/transformer_sd3.py), the parity
test maps ours to theirs with `diffusers_resampler_keys`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

NORM_EPS = 1e-6  # every norm of the adapter (and the host's q/k RMSNorm) uses this epsilon
RESAMPLER_HEAD_DIM = 64  # InstantX's resampler heads are 64 wide (its to_q rows / 64 give the head count)
ENCODER_OUTPUT = "penultimate_hidden_states"  # SigLIP so400m, the layer before the last (729 x 1152)

Scale = Union[float, torch.Tensor]


# --------------------------------------------------------------------------------------------------------------
# The model (InstantX parameter names)


class _PerceiverAttention(nn.Module):
    """`layers.{i}.0`: latents attend over cat(image features, latents); norm1 on features, norm2 on latents."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, heads * RESAMPLER_HEAD_DIM, bias=False)
        self.to_kv = nn.Linear(dim, 2 * heads * RESAMPLER_HEAD_DIM, bias=False)
        self.to_out = nn.Linear(heads * RESAMPLER_HEAD_DIM, dim, bias=False)


class _ResamplerLayer(nn.ModuleList):
    """`layers.{i}`: [attention, feed-forward (LayerNorm, Linear, GELU, Linear), adaLN (SiLU, Linear)]."""

    def __init__(self, dim: int, heads: int, ff_mult: int = 4) -> None:
        super().__init__([
            _PerceiverAttention(dim, heads),
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * ff_mult, bias=False), nn.GELU(),
                          nn.Linear(dim * ff_mult, dim, bias=False)),
            nn.Sequential(nn.SiLU(), nn.Linear(dim, 4 * dim)),
        ])


class _TimeEmbedding(nn.Module):
    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)


class TimeResampler(nn.Module):
    """`image_proj.*`: SigLIP hidden states `[N, L, E]` + timesteps `[N]` -> tokens `[N, Q, C]`, temb `[N, T]`."""

    def __init__(self, embed_dim: int, output_dim: int, hidden_dim: int, depth: int, heads: int, queries: int,
                 timestep_in: int) -> None:
        super().__init__()
        self.timestep_in = timestep_in
        self.latents = nn.Parameter(torch.zeros(1, queries, hidden_dim))
        self.proj_in = nn.Linear(embed_dim, hidden_dim)
        self.proj_out = nn.Linear(hidden_dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(_ResamplerLayer(hidden_dim, heads) for _ in range(depth))
        self.time_embedding = _TimeEmbedding(timestep_in, hidden_dim)

    def forward(self, features: torch.Tensor, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return resample(self, features, timesteps)


class _AdaNorm(nn.Module):
    """`norm_ip`: LayerNorm without affine, shift and scale from `linear(silu(temb))` (shift first)."""

    def __init__(self, temb_dim: int, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(temb_dim, 2 * dim)


class _RMSWeight(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))


class SD3BlockAdapter(nn.Module):
    """`ip_adapter.{i}.*`: one joint block's image K/V projections and the norms of its image attention."""

    def __init__(self, dim: int, temb_dim: int, head_dim: int) -> None:
        super().__init__()
        self.norm_ip = _AdaNorm(temb_dim, dim)
        self.to_k_ip = nn.Linear(dim, dim, bias=False)
        self.to_v_ip = nn.Linear(dim, dim, bias=False)
        self.norm_q = _RMSWeight(head_dim)
        self.norm_k = _RMSWeight(head_dim)
        self.norm_ip_k = _RMSWeight(head_dim)


@dataclass(frozen=True)
class SD3AdapterInfo:
    """What an InstantX SD3 adapter fits: a model `hidden` wide (heads x head_dim) with `blocks` joint blocks,
    fed `encoder_width`-wide SigLIP penultimate hidden states."""

    hidden: int
    blocks: int
    head_dim: int
    encoder_width: int
    tokens: int  # image tokens per reference image
    temb_dim: int

    @property
    def heads(self) -> int:
        return self.hidden // self.head_dim

    def describe(self) -> str:
        return (f"SD3.5 InstantX IP-Adapter ({self.blocks} joint blocks, width {self.hidden} = {self.heads} heads x "
                f"{self.head_dim}; {self.tokens} tokens per image from {self.encoder_width}-wide SigLIP "
                f"penultimate hidden states)")


class SD3IPAdapter(nn.Module):
    """A loaded InstantX SD3.5 adapter: `image_proj` (TimeResampler) and `ip_adapter[i]` per joint block.

    Read-only once built; no parameter requires grad. Its tensors are the file's (dtype as stored).
    """

    def __init__(self, info: SD3AdapterInfo, image_proj: TimeResampler, blocks: Sequence[SD3BlockAdapter],
                 name: str = "SD3.5 IP-Adapter") -> None:
        super().__init__()
        self.info = info
        self.image_proj = image_proj
        self.ip_adapter = nn.ModuleList(blocks)
        self.name = name
        self.host_handle: Any = None  # the host's handle on these weights (ComfyUI: one ModelPatcher, nodes/)

    def describe(self) -> str:
        return f"{self.name}: {self.info.describe()}"


# --------------------------------------------------------------------------------------------------------------
# Reading a file


def _nested(tensors: Mapping[str, Any]) -> Optional[dict[str, Mapping[str, Any]]]:
    """{"image_proj": ..., "ip_adapter": ...} from a nested (InstantX .bin) or flat-prefixed state dict."""
    if isinstance(tensors.get("image_proj"), Mapping) and isinstance(tensors.get("ip_adapter"), Mapping):
        return {"image_proj": tensors["image_proj"], "ip_adapter": tensors["ip_adapter"]}
    nested: dict[str, dict[str, Any]] = {"image_proj": {}, "ip_adapter": {}}
    for key, value in tensors.items():
        head, _, rest = key.partition(".")
        if head in nested and rest:
            nested[head][rest] = value
    return nested if nested["image_proj"] and nested["ip_adapter"] else None


def is_sd3_layout(tensors: Mapping[str, Any]) -> bool:
    """InstantX SD3 keys: a resampler with a time embedding and per-block adaLN image norms."""
    nested = _nested(tensors)
    return (nested is not None and "time_embedding.linear_1.weight" in nested["image_proj"]
            and "0.norm_ip.linear.weight" in nested["ip_adapter"])


def read_sd3_adapter(tensors: Mapping[str, Any], name: str) -> Optional[SD3IPAdapter]:
    """The family reader (processors/ipadapter/families.py): an SD3IPAdapter when `tensors` are InstantX SD3's,
    else None; a recognised but broken file raises IPAdapterFileError naming the file and the problem."""
    # imported here: processors.ipadapter's package imports this reader (families.py), so a module-level import
    # would be circular when this module is imported first
    from ..ipadapter.errors import IPAdapterFileError

    if not is_sd3_layout(tensors):
        return None
    nested = _nested(tensors)
    try:
        info = _info(nested["image_proj"], nested["ip_adapter"])
        resampler = _resampler(nested["image_proj"], info)
        blocks = [_block(nested["ip_adapter"], i, info) for i in range(info.blocks)]
    except (KeyError, RuntimeError, ValueError) as error:
        raise IPAdapterFileError(f"{name}: an SD3.5 InstantX IP-Adapter file, but {error}") from error
    adapter = SD3IPAdapter(info, resampler, blocks, name=name).train(False).requires_grad_(False)
    logger.debug("built %s", adapter.describe())
    return adapter


def _info(proj: Mapping[str, torch.Tensor], ip: Mapping[str, torch.Tensor]) -> SD3AdapterInfo:
    block_ids = sorted({int(k.split(".")[0]) for k in ip if k.split(".")[0].isdigit()})
    if block_ids != list(range(len(block_ids))):
        raise ValueError(f"its ip_adapter blocks are not numbered 0..n-1 (found {block_ids[:5]}...)")
    hidden = int(ip["0.to_k_ip.weight"].shape[0])
    head_dim = int(ip["0.norm_q.weight"].shape[0])
    if hidden % head_dim or int(proj["proj_out.weight"].shape[0]) != hidden:
        raise ValueError(f"its widths disagree: to_k_ip {hidden}, resampler output "
                         f"{int(proj['proj_out.weight'].shape[0])}, head dim {head_dim}")
    return SD3AdapterInfo(hidden=hidden, blocks=len(block_ids), head_dim=head_dim,
                          encoder_width=int(proj["proj_in.weight"].shape[1]),
                          tokens=int(proj["latents"].shape[1]), temb_dim=int(ip["0.norm_ip.linear.weight"].shape[1]))


def _resampler(proj: Mapping[str, torch.Tensor], info: SD3AdapterInfo) -> TimeResampler:
    depth = len({k.split(".")[1] for k in proj if k.startswith("layers.")})
    hidden_dim = int(proj["proj_in.weight"].shape[0])
    with torch.device("meta"):
        module = TimeResampler(embed_dim=info.encoder_width, output_dim=info.hidden, hidden_dim=hidden_dim,
                               depth=depth, heads=int(proj["layers.0.0.to_q.weight"].shape[0]) // RESAMPLER_HEAD_DIM,
                               queries=info.tokens, timestep_in=int(proj["time_embedding.linear_1.weight"].shape[1]))
    module.load_state_dict(dict(proj), strict=True, assign=True)
    return module


def _block(ip: Mapping[str, torch.Tensor], index: int, info: SD3AdapterInfo) -> SD3BlockAdapter:
    prefix = f"{index}."
    state = {k[len(prefix):]: v for k, v in ip.items() if k.startswith(prefix)}
    with torch.device("meta"):
        module = SD3BlockAdapter(info.hidden, info.temb_dim, info.head_dim)
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as error:
        raise ValueError(f"block {index}: {error}") from error
    return module


def diffusers_resampler_keys(key: str) -> str:
    """Our (InstantX) resampler parameter name -> diffusers' `IPAdapterTimeImageProjection` name (the renaming
    of diffusers' loaders/transformer_sd3.py). The per-block names are the same on both sides."""
    parts = key.split(".")
    if parts[0] != "layers":
        return key
    index, rest = parts[1], ".".join(parts[2:])
    renames = {"0.norm1": "ln0", "0.norm2": "ln1", "0.to_q": "attn.to_q", "0.to_kv": "attn.to_kv",
               "0.to_out": "attn.to_out.0", "1.0": "adaln_norm", "1.1": "ff.net.0.proj", "1.3": "ff.net.2",
               "2.1": "adaln_proj"}
    for ours, theirs in renames.items():
        if rest.startswith(ours + "."):
            return f"layers.{index}.{theirs}{rest[len(ours):]}"
    return key


# --------------------------------------------------------------------------------------------------------------
# The maths


def _cast(weight: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """A parameter on `like`'s device and dtype (a no-op when it already is: weights moved with the model)."""
    return None if weight is None else weight.to(device=like.device, dtype=like.dtype)


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return F.linear(x, _cast(layer.weight, x), _cast(layer.bias, x))


def _layer_norm(x: torch.Tensor, layer: Optional[nn.LayerNorm]) -> torch.Tensor:
    if layer is None:
        return F.layer_norm(x, x.shape[-1:], eps=NORM_EPS)
    return F.layer_norm(x, x.shape[-1:], _cast(layer.weight, x), _cast(layer.bias, x), layer.eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the last dim, statistics in float32 (as diffusers' RMSNorm), result in x's dtype."""
    normed = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + NORM_EPS)
    return normed.to(x.dtype) * _cast(weight, x)


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding `[N] -> [N, dim]`, cosines first, frequencies 10000^(-i/half) (no shift)."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    angles = timesteps.float()[:, None] * torch.exp(exponent)[None, :]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(embedding, (0, 1)) if dim % 2 else embedding


def resample(model: TimeResampler, features: torch.Tensor,
             timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The resampler: `[N, L, E]` hidden states, `[N]` timesteps (0..1000) -> (tokens `[N, Q, C]`, temb `[N, T]`),
    in `features`' dtype."""
    emb = timestep_embedding(timesteps, model.timestep_in).to(features.dtype)
    temb = _linear(F.silu(_linear(emb, model.time_embedding.linear_1)), model.time_embedding.linear_2)
    x = _linear(features, model.proj_in) + temb[:, None]
    latents = _cast(model.latents, x).expand(x.shape[0], -1, -1)
    for layer in model.layers:
        latents = _resampler_layer(layer, x, latents, temb)
    return _layer_norm(_linear(latents, model.proj_out), model.norm_out), temb


def _resampler_layer(layer: _ResamplerLayer, x: torch.Tensor, latents: torch.Tensor,
                     temb: torch.Tensor) -> torch.Tensor:
    attn, ff, adaln = layer[0], layer[1], layer[2]
    shift_msa, scale_msa, shift_mlp, scale_mlp = _linear(F.silu(temb), adaln[1]).chunk(4, dim=1)
    features = _layer_norm(x, attn.norm1)
    modulated = _layer_norm(latents, attn.norm2) * (1 + scale_msa[:, None]) + shift_msa[:, None]
    batch, heads = latents.shape[0], attn.heads
    q = _linear(modulated, attn.to_q).view(batch, -1, heads, RESAMPLER_HEAD_DIM).transpose(1, 2)
    k, v = _linear(torch.cat([features, modulated], dim=1), attn.to_kv).chunk(2, dim=-1)
    k = k.reshape(batch, -1, heads, RESAMPLER_HEAD_DIM).transpose(1, 2)
    v = v.reshape(batch, -1, heads, RESAMPLER_HEAD_DIM).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, heads * RESAMPLER_HEAD_DIM)
    latents = _linear(out, attn.to_out) + latents
    hidden = _layer_norm(latents, ff[0]) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return _linear(F.gelu(_linear(hidden, ff[1])), ff[3]) + latents


def block_image_kv(block: SD3BlockAdapter, tokens: torch.Tensor, temb: torch.Tensor,
                   head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One joint block's image keys (through its RMSNorm) and values `[N, Q, C]` from the step's tokens/temb."""
    shift, scale = _linear(F.silu(temb), block.norm_ip.linear).chunk(2, dim=1)
    normed = _layer_norm(tokens, None) * (1 + scale[:, None]) + shift[:, None]
    k = _linear(normed, block.to_k_ip)
    k = rms_norm(k.unflatten(-1, (-1, head_dim)), block.norm_ip_k.weight).flatten(-2)
    return k, _linear(normed, block.to_v_ip)


# --------------------------------------------------------------------------------------------------------------
# The joint-block image attention


def renorm_obstacle(host_weight: Optional[torch.Tensor]) -> str:
    """Why the adapter's own q/k normalisation cannot be recovered from this host norm's output ('' if it can):
    a zero in the host's RMSNorm weight erases that channel."""
    if host_weight is None:
        return ""
    zeros = int((host_weight == 0).sum())
    return f"its RMSNorm weight has {zeros} zero entries" if zeros else ""


def renormalize(x4: torch.Tensor, host_weight: Optional[torch.Tensor], own_weight: torch.Tensor,
                out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The adapter's RMSNorm of the raw projection, from what the host gives: `x4` `[B, L, H, D]` is the host's
    RMSNorm output (host_weight given) or the raw projection (host_weight None). Ratio in float32. `out`: where
    to write it (a slice of a joint buffer)."""
    if host_weight is None:
        normed = rms_norm(x4, own_weight)
        return normed if out is None else out.copy_(normed)
    ratio = own_weight.to(x4.device, torch.float32) / host_weight.to(x4.device, torch.float32)
    return torch.mul(x4, ratio.to(x4.dtype), out=out)


@dataclass(frozen=True)
class JointBranch:
    """One adapter's image attention in one joint block: its image K/V `[B or 1, Nip, C]` (keys through its
    RMSNorm), its q/k RMSNorm weights, the output scale (float or `[B]`) and an optional `[1 or B, Li]` mask."""

    k: torch.Tensor
    v: torch.Tensor
    norm_q: torch.Tensor
    norm_k: torch.Tensor
    scale: Scale = 1.0
    mask: Optional[torch.Tensor] = None


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # BMHK q, k, v -> BMHK out


def joint_image_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                          branches: Sequence[JointBranch], attend: Attend,
                          host_q_norm: Optional[torch.Tensor] = None,
                          host_k_norm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Sum over adapters of `scale * mask * attention(norm_q(q), cat(norm_k(k), ip_k), cat(v, ip_v))`.

    q, k, v: the image stream's `[B, Li, C]` (v may be `[B, Li, H, D]`) as the host's attention receives them
    (q/k through `host_*_norm` when given). `attend` is the engine's plain attention (`Planner.attention`). A mask
    always multiplies the output here (the image keys share the softmax, so an in-softmax gate would also move
    the image's own attention). Returns `[B, Li, C]` in q's dtype.
    """
    batch, length, width = q.shape
    head_dim = width // heads
    # [B, L, H*D] or [B, L, H, D] (ComfyUI's MMDiT passes v unflattened) -> [B, L, H, D] views
    q4, k4, v4 = (t.reshape(batch, length, heads, head_dim) for t in (q, k, v))
    total: Optional[torch.Tensor] = None
    for branch in branches:
        ip_k = branch.k.to(q.dtype).unflatten(-1, (heads, head_dim)).expand(batch, -1, -1, -1)
        ip_v = branch.v.to(q.dtype).unflatten(-1, (heads, head_dim)).expand(batch, -1, -1, -1)
        keys = _joint(k4, ip_k, lambda part: renormalize(k4, host_k_norm, branch.norm_k, out=part))
        values = _joint(v4, ip_v, lambda part: part.copy_(v4))
        query = renormalize(q4, host_q_norm, branch.norm_q, out=_heads_first(q4, length))
        out = attend(query, keys, values).reshape(batch, length, width)
        factor = _factor(branch, out)
        out = out.mul_(factor) if out.is_contiguous() else out * factor
        total = out if total is None else total.add_(out)
    return q.new_zeros(q.shape) if total is None else total


def _heads_first(like: torch.Tensor, length: int) -> torch.Tensor:
    """An empty `[B, length, H, D]` view of `[B, H, length, D]` storage: the layout the attention kernels read
    fastest (SDPA's own; measured on CPU, benchmarks/README.md "SD3.5"), still a BMHK view for the planner."""
    batch, _, heads, head_dim = like.shape
    return like.new_empty(batch, heads, length, head_dim).transpose(1, 2)


def _joint(image: torch.Tensor, adapter: torch.Tensor, fill_image: Callable[[torch.Tensor], Any]) -> torch.Tensor:
    """cat(image part, adapter part) along the tokens `[B, Li + Nip, H, D]`, the image part written straight into
    the joint buffer by `fill_image` (one pass over the image keys/values, not a product and then a copy)."""
    length = image.shape[1]
    joint = _heads_first(image, length + adapter.shape[1])
    fill_image(joint[:, :length])
    joint[:, length:] = adapter
    return joint


def _factor(branch: JointBranch, like: torch.Tensor) -> Union[float, torch.Tensor]:
    factor: Union[float, torch.Tensor] = branch.scale if not isinstance(branch.scale, torch.Tensor) else \
        branch.scale.to(like.device, like.dtype).reshape(-1, 1, 1)
    if branch.mask is not None:
        factor = branch.mask.to(like.device, like.dtype)[:, :, None] * factor
    return factor


# --------------------------------------------------------------------------------------------------------------
# Per-step tokens: the resampler once per step, not per block


@dataclass(eq=False)
class StepTokens:
    """The resampler's output for the current model call, kept for the host's sigmas tensor object: every block
    of one call gets the same object (no host sync to compare values), the next step brings a new one.

    `rows(sigmas, ...)` runs the resampler on the call's rows only: row r uses the positive or negative
    embeddings as `negative[r]` says, at timestep `timestep_of(sigmas)[r]`.
    """

    positive: torch.Tensor  # [n, L, E] SigLIP hidden states of the n reference images
    negative: torch.Tensor  # same shape (zeros, as diffusers, unless a negative image was given)
    _memo: list = field(default_factory=lambda: [None, None, None], repr=False)  # [sigmas, key, (tokens, temb)]

    def rows(self, model: TimeResampler, sigmas: torch.Tensor, timesteps: Callable[[torch.Tensor], torch.Tensor],
             negative_rows: tuple[bool, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens `[B, n*Q, C]`, temb `[B, T]`) for the call's B rows, computed once per sigmas tensor."""
        key = (negative_rows, dtype, sigmas.device)
        if self._memo[0] is sigmas and self._memo[1] == key:
            return self._memo[2]
        result = self._compute(model, sigmas, timesteps, negative_rows, dtype)
        self._memo[:] = [sigmas, key, result]
        return result

    def _compute(self, model, sigmas, timesteps, negative_rows, dtype):
        device, count = sigmas.device, self.positive.shape[0]
        sources = (self.positive.to(device, dtype), self.negative.to(device, dtype))
        features = torch.cat([sources[int(n)] for n in negative_rows])  # [B*n, L, E]
        steps = timesteps(sigmas.reshape(-1)).to(device)
        if steps.numel() != len(negative_rows):  # one sigma for the whole call
            steps = steps[:1].expand(len(negative_rows))
        steps = steps.repeat_interleave(count)
        tokens, temb = resample(model, features, steps)
        return tokens.reshape(len(negative_rows), -1, tokens.shape[-1]), temb[::count]

    def release(self) -> None:
        self._memo[:] = [None, None, None]
