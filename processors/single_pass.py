"""Single-pass IP-Adapter attention for short image key sets, in plain PyTorch matmuls.

The separate formulation runs one attention kernel for the text and one per adapter, each reading every
query and writing a full output that is then added up. For a few image tokens the adapter kernels are
dominated by that traffic, not by their arithmetic. Here, per batch row, the queries `[H, Mq, D]` are
multiplied with the text keys and with all adapters' image keys (back to back, so Q stays in cache), the
text scores get one softmax, each adapter's scores get their own softmax in place with the adapter's
output weight (float, per-row scale, per-query mask) folded into its probabilities, and the output is
`P_text @ V_text` plus `P_img @ V_img` accumulated into the same buffer. This is exactly
`attn(text) + sum_i w_i * attn(image_i)` (separate softmaxes, not a joint one).

It materializes the scores `[H, Mq, Mk]` per batch row, so it is only chosen where the benchmark showed it
wins (see `fits` and benchmarks/README.md): CPU, float32, at least `MIN_QUERIES` queries, and at least
`MIN_ADAPTERS` adapters of at most `MAX_TOKENS_PER_ADAPTER` image tokens each. The planner (`planner.py`) decides, and only for `auto`
where xformers cannot run: an explicit op, sdpa included, runs the kernel the user chose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import torch

Factor = Union[float, torch.Tensor]  # float, or a `[B or 1, Mq or 1, 1, 1]` tensor (BMHK output layout)

NAME = "single pass"
# The rule, from benchmarks/results/attention_layer_cpu.md (torch 2.10, fp32, batch 2, 77 text tokens, per-round
# ratios with 95 % intervals): it wins with three 4-token adapters (0.75 to 0.87 of the separate calls at 256 to
# 4096 queries); with one adapter it is within noise (4 tokens) or slower (16 tokens: up to 1.14), with 16-token
# adapters mostly slower, and below 256 queries always slower. Only the measured wins are in the rule.
MIN_QUERIES = 256
MIN_ADAPTERS = 3
MAX_TOKENS_PER_ADAPTER = 4


@dataclass(frozen=True)
class Segment:
    """One adapter: keys/values `[B, L, H, D]` (views are fine) and its output factor."""

    k: torch.Tensor
    v: torch.Tensor
    factor: Factor = 1.0


def fits(q4: torch.Tensor, image_lengths: Sequence[int]) -> bool:
    """The measured rule: where the single pass beats the separate calls (inputs without a bias)."""
    return (len(image_lengths) >= MIN_ADAPTERS and max(image_lengths) <= MAX_TOKENS_PER_ADAPTER
            and q4.device.type == "cpu" and q4.dtype == torch.float32 and q4.shape[1] >= MIN_QUERIES)


def describe(q4: torch.Tensor, text_len: int, image_lengths: Sequence[int]) -> str:
    lengths = " + ".join(str(n) for n in image_lengths)
    return (f"{NAME} (PyTorch matmuls) for {q4.shape[1]} queries, {q4.shape[2]} heads x {q4.shape[3]}, "
            f"{text_len} text + {lengths} image keys, {q4.dtype} on {q4.device.type}")


def _factor_for_row(factor: Factor, row: int) -> Factor:
    """The factor for batch row `row`, shaped `[1, Mq or 1, 1]` to scale `[H, Mq, L]` probabilities."""
    if not isinstance(factor, torch.Tensor):
        return factor
    picked = factor[row if factor.shape[0] > 1 else 0]  # [Mq or 1, 1, 1]
    return picked.reshape(1, -1, 1)


def _weighted_softmax_(scores: torch.Tensor, factor: Factor) -> None:
    """In place: `softmax(scores, -1) * factor` (a strided slice is fine)."""
    scores.sub_(scores.amax(-1, keepdim=True)).exp_()
    scores.mul_(factor / scores.sum(-1, keepdim=True))


def _image_kv(segments: Sequence[Segment]) -> tuple[torch.Tensor, torch.Tensor]:
    if len(segments) == 1:
        return segments[0].k, segments[0].v
    return torch.cat([s.k for s in segments], 1), torch.cat([s.v for s in segments], 1)


def single_pass(q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, segments: Sequence[Segment]) -> torch.Tensor:
    """BMHK q `[B, Mq, H, D]`, text k/v `[B, Mt, H, D]`, adapters -> `[B, Mq, H, Dv]` (contiguous)."""
    batch, q_len, heads, dim = q4.shape
    scale = 1.0 / math.sqrt(dim)
    ki, vi = _image_kv(segments)
    lengths = [s.k.shape[1] for s in segments]
    out = torch.empty(batch, q_len, heads, v4.shape[-1], dtype=q4.dtype, device=q4.device)
    image_scores = torch.empty(heads, q_len, sum(lengths), dtype=q4.dtype, device=q4.device)
    for row in range(batch):
        qb = q4[row].transpose(0, 1)  # [H, Mq, D], a strided view
        text = torch.baddbmm(image_scores.new_empty(()), qb, k4[row].permute(1, 2, 0), beta=0.0, alpha=scale)
        torch.baddbmm(image_scores, qb, ki[row].permute(1, 2, 0), beta=0.0, alpha=scale, out=image_scores)
        start = 0
        for segment, length in zip(segments, lengths):
            _weighted_softmax_(image_scores[..., start:start + length], _factor_for_row(segment.factor, row))
            start += length
        ob = out[row].transpose(0, 1)  # [H, Mq, Dv] view of the output
        torch.bmm(text.softmax(-1), v4[row].transpose(0, 1), out=ob)
        ob.baddbmm_(image_scores, vi[row].transpose(0, 1))
    return out
