"""XFormersIPAdapterAttnProcessor: text attention plus any number of IP-Adapter attentions.

    out = attn(q, k_text, v_text) + sum_i scale_i * mask_i * attn(q, k_ip_i, v_ip_i)

Queries are projected once by the host and viewed (not copied) into xformers' BMHK layout, shared by every
attention. Each adapter has its own keys/values, an output scale (a float or one per batch row) and an
optional mask over the queries, applied either to the output ("multiply output", any operator) or inside the
softmax through an aligned additive bias ("attention bias"). What runs (operator, and separate calls, one
fused block-diagonal call or the single pass) is the planner's decision (`planner.py`); this module builds
the request and carries the plan out.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch

from . import single_pass as sp
from .backends import AttentionOpConfig
from .bias import aligned_bias
from .fused import PackedRunner, run_fused
from .layout import heads_view
from .memo import DerivedTensors
from .planner import FUSED, SINGLE_PASS, Plan, Planner

logger = logging.getLogger(__name__)

Scale = Union[float, torch.Tensor]


@dataclass(frozen=True)
class IPBranch:
    """One adapter's contribution at one attention site.

    k, v: `[Bk, Lk, H*D]` projected image tokens; Bk is 1, the query batch, or a multiple of it (several
    images folded into the token axis, as ComfyUI's own attention does). scale: float or `[B]`. mask:
    `[1 or B, Mq]` weights over the queries (already resized to this block), or None. Hosts that call the
    processor at every step should pass the same tensor objects each time (cached K/V, masks and scales):
    what the processor derives from them is then computed once, not per call.
    """

    k: torch.Tensor
    v: torch.Tensor
    scale: Scale = 1.0
    mask: Optional[torch.Tensor] = None

    @property
    def is_zero(self) -> bool:
        return not isinstance(self.scale, torch.Tensor) and self.scale == 0


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

    `attention_op`: an `AttentionOpConfig`, or None for `auto` with default options. `batch_limit` and
    `fused_runner` go to the planner (tests).
    """

    def __init__(self, attention_op: Optional[AttentionOpConfig] = None, batch_limit: Optional[int] = None,
                 fused_runner: Optional[PackedRunner] = None) -> None:
        self._batch_limit = batch_limit
        self._fused_runner = fused_runner
        self.attention_op = attention_op
        self._derived = DerivedTensors("derived attention inputs")

    @property
    def attention_op(self) -> Optional[AttentionOpConfig]:
        return self._attention_op

    @attention_op.setter
    def attention_op(self, value: Optional[AttentionOpConfig]) -> None:
        self._attention_op = value
        self.planner = Planner(value, self._batch_limit, self._fused_runner)

    @property
    def config(self) -> AttentionOpConfig:
        return self.planner.config

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
                 branches: Sequence[IPBranch] = (), *, text_bias: Optional[torch.Tensor] = None,
                 precision: Optional[torch.dtype] = None, base: Optional[torch.Tensor] = None) -> torch.Tensor:
        """`base`: the `[B, Mq, H*D]` output of another attention (e.g. a replace patch installed by another
        pack, or a Flux/SD3 block's joint attention) to add the adapters to; the text attention is then not
        computed here."""
        batch, q_len, inner = q.shape
        out_dtype = q.dtype
        compute = torch.float32 if precision == torch.float32 and q.dtype != torch.float32 else q.dtype
        active = [b for b in branches if not b.is_zero]
        in_softmax = self.config.mask_mode == "attention bias"
        q4 = heads_view(q.to(compute), batch, heads)
        keys, values, biases = [], [], []
        if base is None:
            keys.append(heads_view(k.to(compute), batch, heads))
            values.append(heads_view(v.to(compute), batch, heads))
            biases.append(text_bias)
        for branch in active:
            bk, bv, bias = self._branch_inputs(branch, batch, heads, compute, in_softmax)
            keys.append(bk)
            values.append(bv)
            biases.append(bias)
        plan = self.planner.plan(q4, keys, values, biases, has_text=base is None)
        if plan.formulation == SINGLE_PASS:
            out = self._run_single_pass(q4, keys, values, active)
            return out.reshape(batch, q_len, inner).to(out_dtype)
        outs = self._attend(plan, q4, keys, values, biases)
        if base is None:
            result, outs = outs[0], outs[1:]
            result = result if result.is_contiguous() else result.contiguous()
        else:
            result = base.to(compute).reshape(batch, q_len, heads, -1).clone()
        for out, branch in zip(outs, active):
            factor = self._factor(branch, None if in_softmax else branch.mask, out)
            if factor is None:
                result.add_(out, alpha=float(branch.scale))
            else:
                result.addcmul_(out, factor)
        return result.reshape(batch, q_len, inner).to(out_dtype)

    # ---------------------------------------------------------------------------------------------------------

    def _branch_inputs(self, branch: IPBranch, batch: int, heads: int, compute: torch.dtype,
                       in_softmax: bool) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """The adapter's BMHK keys/values and bias. With an in-softmax mask: a null token appended and the
        mask's log-bias, both derived once per (K/V, mask) and layout, not per call."""
        bk = heads_view(branch.k.to(compute), batch, heads)
        bv = heads_view(branch.v.to(compute), batch, heads)
        if not (in_softmax and branch.mask is not None):
            return bk, bv, None
        params = (batch, heads, compute)
        bk, bv = self._derived.get((branch.k, branch.v), ("null token",) + params, lambda: _with_null_token(bk, bv))
        bias = self._derived.get((branch.mask,), ("bias", bk.shape[1] - 1) + params,
                                 lambda: mask_bias(branch.mask, batch, heads, bk.shape[1] - 1, compute))
        return bk, bv, bias

    def _factor(self, branch: IPBranch, mask: Optional[torch.Tensor], like: torch.Tensor) -> Optional[torch.Tensor]:
        sources = tuple(t for t in (branch.scale, mask) if isinstance(t, torch.Tensor))
        if not sources:
            return None
        scale = None if isinstance(branch.scale, torch.Tensor) else float(branch.scale)
        return self._derived.get(sources, ("factor", scale, like.dtype, like.device),
                                 lambda: _row_factor(branch.scale, mask, like))

    def _attend(self, plan: Plan, q4, keys, values, biases) -> list[torch.Tensor]:
        if plan.formulation == FUSED:
            return run_fused(q4, keys, values, plan.runners[0])
        return [run(q4, k4, v4, bias) for run, k4, v4, bias in zip(plan.runners, keys, values, biases)]

    def _run_single_pass(self, q4, keys, values, active: Sequence[IPBranch]) -> torch.Tensor:
        segments = []
        for k4, v4, branch in zip(keys[1:], values[1:], active):
            factor = self._factor(branch, branch.mask, q4)
            segments.append(sp.Segment(k4, v4, float(branch.scale) if factor is None else factor))
        return sp.single_pass(q4, keys[0], values[0], segments)

    def held_tensors(self) -> list[torch.Tensor]:
        """What this processor keeps between calls (derived from its callers' cached tensors)."""
        return self._derived.tensors()
