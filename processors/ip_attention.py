"""XFormersIPAdapterAttnProcessor: text attention plus any number of IP-Adapter attentions.

    out = attn(q, k_text, v_text) + sum_i scale_i * mask_i * attn(q, k_ip_i, v_ip_i)

Queries are projected once by the host and viewed (not copied) into xformers' BMHK layout, shared by every
attention. Each adapter has its own keys/values, an output scale (a float or one per batch row) and an
optional mask over the queries, applied either to the output ("multiply output", any operator) or inside the
softmax through an aligned additive bias ("attention bias"). In fused mode the text and every adapter run in
one block-diagonal xformers call.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

from . import backends
from . import single_pass as sp
from .backends import AttentionOpConfig, UnsupportedOperatorError
from .bias import aligned_bias
from .fused import PackedRunner, fused_unavailable_reason, pack, run_fused

logger = logging.getLogger(__name__)

Scale = Union[float, torch.Tensor]
DEFAULT_CONFIG = AttentionOpConfig()  # `attention_op = None` means auto with default options


@dataclass(frozen=True)
class IPBranch:
    """One adapter's contribution at one attention site.

    k, v: `[Bk, Lk, H*D]` projected image tokens; Bk is 1, the query batch, or a multiple of it (several
    images folded into the token axis, as ComfyUI's own attention does). scale: float or `[B]`. mask:
    `[1 or B, Mq]` weights over the queries (already resized to this block), or None.
    """

    k: torch.Tensor
    v: torch.Tensor
    scale: Scale = 1.0
    mask: Optional[torch.Tensor] = None

    @property
    def is_zero(self) -> bool:
        return not isinstance(self.scale, torch.Tensor) and self.scale == 0


def _heads_view(x: torch.Tensor, batch: int, heads: int) -> torch.Tensor:
    """`[Bx, N, H*D]` -> `[B, Bx/B*N or N, H, D]`, a view where the layout allows; batch 1 is expanded."""
    head_dim = x.shape[-1] // heads
    if x.shape[0] == 1 and batch != 1:
        return x.view(1, -1, heads, head_dim).expand(batch, -1, -1, -1)
    if x.shape[0] % batch:
        raise ValueError(f"keys/values batch {x.shape[0]} is not 1 or a multiple of the query batch {batch}")
    return x.reshape(batch, -1, heads, head_dim)


def _row_factor(scale: Scale, mask: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
    """scale (and mask) as a `[B or 1, Mq or 1, 1, 1]` factor for the output, or None for a plain float."""
    factor = None
    if isinstance(scale, torch.Tensor):
        factor = scale.to(like.device, like.dtype).reshape(-1, 1, 1, 1)
    if mask is not None:
        weights = mask.to(like.device, like.dtype)[:, :, None, None]
        factor = weights if factor is None else factor * weights
        if not isinstance(scale, torch.Tensor):
            factor = factor * scale
    return factor


def _with_null_token(k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append a zero key/value: where the mask is 0 every query attends to it, so the adapter adds 0."""
    zeros = k.new_zeros(k.shape[0], 1, k.shape[2], k.shape[3])
    return torch.cat([k, zeros], 1), torch.cat([v, zeros.expand(-1, -1, -1, v.shape[3])], 1)


def mask_bias(mask: torch.Tensor, batch: int, heads: int, keys: int, dtype: torch.dtype) -> torch.Tensor:
    """In-softmax gating for `keys` image tokens plus the null token: log(m) on the image keys and log(1-m) on
    the null key. A 0/1 mask gives exactly the output-weighted result; fractional values gate softly."""
    m = mask.to(torch.float32).clamp(0, 1)[:, None, :, None]  # [Bm, 1, Mq, 1]
    values = torch.cat([torch.log(m).expand(-1, -1, -1, keys), torch.log1p(-m)], dim=-1)
    return aligned_bias(values, (batch, heads, mask.shape[1], keys + 1), dtype, mask.device)


class XFormersIPAdapterAttnProcessor:
    """The engine; hosts give it projected q/k/v `[B, N, H*D]` and the adapters' branches.

    `attention_op`: an `AttentionOpConfig`, or None for `auto` with default options. `batch_limit` overrides
    the operators' grid limit (tests). `fused_runner` replaces the xformers kernel of fused mode (tests prove
    the packing on CPU with a materialized bias).
    """

    def __init__(self, attention_op: Optional[AttentionOpConfig] = None, batch_limit: Optional[int] = None,
                 fused_runner: Optional[PackedRunner] = None) -> None:
        self.attention_op = attention_op
        self.batch_limit = batch_limit
        self.fused_runner = fused_runner
        self._fused_plans: dict[tuple, Optional[PackedRunner]] = {}
        self._single_pass_lines: dict[tuple, str] = {}

    @property
    def config(self) -> AttentionOpConfig:
        return self.attention_op or DEFAULT_CONFIG

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                 branches: Sequence[IPBranch] = (), *, text_bias: Optional[torch.Tensor] = None,
                 precision: Optional[torch.dtype] = None, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`base`: the `[B, Mq, H*D]` output of another attention (e.g. a replace patch installed by another
        pack) to add the adapters to; the text attention is then not computed here."""
        batch, q_len, inner = q.shape
        out_dtype = q.dtype
        compute = torch.float32 if precision == torch.float32 and q.dtype != torch.float32 else q.dtype
        active = [b for b in branches if not b.is_zero]
        q4 = _heads_view(q.to(compute), batch, heads)
        keys, values, biases = [], [], []
        if base is None:
            keys.append(_heads_view(k.to(compute), batch, heads))
            values.append(_heads_view(v.to(compute), batch, heads))
            biases.append(text_bias)
        in_softmax = self.config.mask_mode == "attention bias"
        for branch in active:
            bk = _heads_view(branch.k.to(compute), batch, heads)
            bv = _heads_view(branch.v.to(compute), batch, heads)
            bias = None
            if in_softmax and branch.mask is not None:
                bias = mask_bias(branch.mask, batch, heads, bk.shape[1], compute)
                bk, bv = _with_null_token(bk, bv)
            keys.append(bk)
            values.append(bv)
            biases.append(bias)
        if base is None and self._single_pass_applies(q4, keys, values, biases):
            return self._run_single_pass(q4, keys, values, active).reshape(batch, q_len, inner).to(out_dtype)
        outs = self._attend(q4, keys, values, biases) if keys else []
        if base is None:
            result, outs = outs[0], outs[1:]
            result = result if result.is_contiguous() else result.contiguous()
        else:
            result = base.to(compute).reshape(batch, q_len, heads, -1).clone()
        for out, branch in zip(outs, active):
            factor = _row_factor(branch.scale, None if in_softmax else branch.mask, out)
            if factor is None:
                result.add_(out, alpha=float(branch.scale))
            else:
                result.addcmul_(out, factor)
        return result.reshape(batch, q_len, inner).to(out_dtype)

    # ---------------------------------------------------------------------------------------------------------

    def _single_pass_applies(self, q4, keys, values, biases) -> bool:
        """The single pass where the rule in `single_pass.applies` says it wins and `auto` would otherwise
        fall back to SDPA (xformers cannot run); reported once per run with the reason, like an operator."""
        has_bias = any(b is not None for b in biases)
        if not sp.applies(self.config.op, q4, [k.shape[1] for k in keys[1:]], has_bias):
            return False
        key = (q4.shape[1:], q4.dtype, q4.device, keys[0].shape[1], tuple(k.shape[1] for k in keys[1:]))
        line = self._single_pass_lines.get(key)
        if line is None:
            resolution = backends.resolve_uncached(self.config.op, q4, keys[0], values[0], None,
                                                   self.config.on_unsupported, self.batch_limit)
            runs_xformers = resolution.ran.startswith("xformers")
            line = "" if runs_xformers else resolution.report(sp.describe(q4, keys[0].shape[1], key[4]))
            self._single_pass_lines[key] = line
        if not line:
            return False
        backends.note(line)
        return True

    def _run_single_pass(self, q4, keys, values, active: Sequence[IPBranch]) -> torch.Tensor:
        segments = []
        for k4, v4, branch in zip(keys[1:], values[1:], active):
            factor = _row_factor(branch.scale, branch.mask, q4)
            segments.append(sp.Segment(k4, v4, float(branch.scale) if factor is None else factor))
        return sp.single_pass(q4, keys[0], values[0], segments)

    def _attend(self, q4, keys, values, biases) -> list[torch.Tensor]:
        runner = self._fused_plan(q4, keys, values, biases) if self.config.fused and len(keys) > 1 else None
        if runner is not None:
            return run_fused(q4, keys, values, runner)
        return [self._attend_one(q4, k4, v4, bias) for k4, v4, bias in zip(keys, values, biases)]

    def _attend_one(self, q4, k4, v4, bias) -> torch.Tensor:
        cfg = self.config
        return backends.attention(q4, k4, v4, bias, op=cfg.op, on_unsupported=cfg.on_unsupported,
                                  batch_limit=self.batch_limit)

    def _fused_plan(self, q4, keys, values, biases) -> Optional[PackedRunner]:
        """The runner for the packed call, or None (separate calls) with the reason logged once."""
        if self.fused_runner is not None:
            return self.fused_runner
        key = (backends.signature(q4, keys[0], values[0], biases[0]),
               tuple(k.shape[1] for k in keys), tuple(b is None for b in biases))
        if key not in self._fused_plans:
            self._fused_plans[key] = self._plan_fused(q4, keys, values, biases)
        return self._fused_plans[key]

    def _plan_fused(self, q4, keys, values, biases) -> Optional[PackedRunner]:
        cfg = self.config
        why = fused_unavailable_reason()
        if not why and any(b is not None for b in biases):
            why = "fused mode cannot combine with a tensor bias (text mask or 'attention bias' mask mode)"
        if not why and cfg.op.startswith("sdpa"):
            why = f"fused mode needs an xformers operator; {cfg.op!r} is PyTorch SDPA"
        if not why:
            bias, qp, kp, vp = pack(q4, keys, values)
            try:
                resolution = backends.resolve_uncached(cfg.op, qp, kp, vp, bias, cfg.on_unsupported,
                                                       self.batch_limit)
                if resolution.ran.startswith("xformers"):
                    logger.info("fused attention: %s", resolution.report())
                    return resolution.runner
                why = resolution.report()
            except UnsupportedOperatorError as error:
                if cfg.on_unsupported == "error" and cfg.op != "auto":
                    raise
                why = str(error)
        logger.warning("fused attention not possible, running separate calls: %s", why)
        return None
