"""The single-pass formulation equals the separate attentions (float64 reference), and is chosen by its rule."""

import pytest
import torch

from processors import planner
from processors import single_pass as sp
from processors.backends import AttentionOpConfig
from harness.oracle import reference_attention
from processors.ip_attention import IPBranch, XFormersIPAdapterAttnProcessor, _row_factor
from processors.layout import heads_view

HEADS, DIM = 8, 40
INNER = HEADS * DIM


@pytest.fixture(autouse=True)
def fresh_cache():
    planner.begin_run()


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def case(batch=2, q_len=256, lengths=(4, 4), seed=0, mask=True, row_scale=True, image_batch=1):
    """q/k/v `[B, N, H*D]` float64 and one branch per image length: float, masked and per-row scales."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = rand(gen, batch, q_len, INNER), rand(gen, batch, 77, INNER), rand(gen, batch, 77, INNER)
    scales = [0.7, torch.tensor([1.0, -0.5][:batch], dtype=torch.float64) if row_scale else 0.3, 1.3]
    weights = (torch.rand(1, q_len, generator=gen, dtype=torch.float64) > 0.5).double() if mask else None
    branches = []
    for i, length in enumerate(lengths):
        rows = image_batch * (batch if i % 2 else 1)
        branches.append(IPBranch(rand(gen, rows, length, INNER), rand(gen, rows, length, INNER),
                                 scales[i % len(scales)], weights if i == 0 else None))
    return q, k, v, branches


def as_fp32(q, k, v, branches):
    return q.float(), k.float(), v.float(), [IPBranch(b.k.float(), b.v.float(), b.scale, b.mask) for b in branches]


def direct(q, k, v, branches):
    """`single_pass` called on BMHK views, as the processor calls it."""
    batch = q.shape[0]
    view = lambda t: heads_view(t, batch, HEADS)  # noqa: E731
    segments = []
    for b in branches:
        factor = _row_factor(b.scale, b.mask, q)
        segments.append(sp.Segment(view(b.k), view(b.v), float(b.scale) if factor is None else factor))
    return sp.single_pass(view(q), view(k), view(v), segments).reshape(q.shape)


@pytest.mark.parametrize("lengths", [(4,), (4, 4), (16,), (4, 4, 4), (257,)])
def test_float64_equals_separate_attentions(lengths):
    q, k, v, branches = case(lengths=lengths)
    ref = reference_attention(q, k, v, HEADS, branches)
    assert (direct(q, k, v, branches) - ref).abs().max().item() <= 1e-12


@pytest.mark.parametrize("image_batch", [1, 2])
def test_fp32_within_1e5_of_float64(image_batch):
    q, k, v, branches = case(lengths=(4, 16, 4), image_batch=image_batch)
    ref = reference_attention(q, k, v, HEADS, branches)
    out = direct(*as_fp32(q, k, v, branches))
    assert out.dtype == torch.float32
    assert (out.double() - ref).abs().max().item() <= 1e-5


def test_soft_mask_and_zero_weight_rows_are_exact():
    q, k, v, branches = case(lengths=(4, 4), mask=False)
    gen = torch.Generator().manual_seed(3)
    soft = torch.rand(2, q.shape[1], generator=gen, dtype=torch.float64)
    branches = [IPBranch(branches[0].k, branches[0].v, torch.tensor([0.0, 2.0], dtype=torch.float64), soft),
                branches[1]]
    ref = reference_attention(q, k, v, HEADS, branches)
    assert (direct(q, k, v, branches) - ref).abs().max().item() <= 1e-12


def test_large_score_gaps_do_not_underflow():
    """Each segment is normalized by its own max: image scores far below the text ones stay exact."""
    q, k, v, branches = case(lengths=(4,), mask=False)
    branches = [IPBranch(branches[0].k * -50.0, branches[0].v, 1.0)]
    ref = reference_attention(q * 4.0, k * 40.0, v, HEADS, branches)
    out = direct(q * 4.0, k * 40.0, v, branches)
    assert torch.isfinite(out).all() and (out - ref).abs().max().item() <= 1e-9


# --- selection by the processor ----------------------------------------------------------------------------

def processor_run(config=AttentionOpConfig(), q_len=256, lengths=(4, 4, 4), **kw):
    q, k, v, branches = case(q_len=q_len, lengths=lengths)
    planner.begin_run()
    q, k, v, branches = as_fp32(q, k, v, branches)
    out = XFormersIPAdapterAttnProcessor(config)(q, k, v, HEADS, branches, **kw)
    q, k, v, branches = case(q_len=q_len, lengths=lengths)
    ran = any(f": ran {sp.NAME}" in line for line in planner.run_reports())
    return out, reference_attention(q, k, v, HEADS, branches), ran


def test_processor_runs_single_pass_where_the_rule_applies_and_stays_exact():
    out, ref, ran = processor_run(AttentionOpConfig(op="auto"))
    assert ran
    assert (out.double() - ref).abs().max().item() <= 1e-5
    line = next(r for r in planner.run_reports() if sp.NAME in r)
    assert line.startswith("attention op 'auto': ran single pass (PyTorch matmuls)") and "device=cpu" in line


@pytest.mark.parametrize("config, q_len, lengths", [
    (AttentionOpConfig(op="sdpa:math"), 256, (4, 4, 4)),  # an explicit kernel keeps the separate calls
    (AttentionOpConfig(op="sdpa"), 256, (4, 4, 4)),
    (AttentionOpConfig(mask_mode="attention bias"), 256, (4, 4, 4)),  # in-softmax masks need a tensor bias
    (AttentionOpConfig(), 64, (4, 4, 4)),  # too few queries
    (AttentionOpConfig(), 256, (4, 4)),  # too few adapters
    (AttentionOpConfig(), 256, (16, 4, 4)),  # an adapter with too many image tokens
])
def test_processor_keeps_separate_calls_outside_the_rule(config, q_len, lengths):
    out, ref, ran = processor_run(config, q_len, lengths)
    assert not ran
    assert (out.double() - ref).abs().max().item() <= 1e-5


def test_text_bias_keeps_separate_calls():
    q, k, v, branches = case()
    bias = torch.zeros(1, 1, 256, 77)
    planner.begin_run()
    q, k, v, branches = as_fp32(q, k, v, branches)
    XFormersIPAdapterAttnProcessor()(q, k, v, HEADS, branches, text_bias=bias)
    assert not any(sp.NAME in line for line in planner.run_reports())


def test_rule():
    q4 = torch.zeros(2, 256, HEADS, DIM)
    assert sp.fits(q4, [4, 4, 4])
    assert sp.fits(q4, [sp.MAX_TOKENS_PER_ADAPTER] * sp.MIN_ADAPTERS)
    assert sp.fits(q4, [1, 2, 3, 4, 4])
    assert not sp.fits(q4, [sp.MAX_TOKENS_PER_ADAPTER] * (sp.MIN_ADAPTERS - 1))
    assert not sp.fits(q4, [4, 4, sp.MAX_TOKENS_PER_ADAPTER + 1])
    assert not sp.fits(q4, [])
    assert not sp.fits(q4[:, :sp.MIN_QUERIES - 1], [4, 4, 4])
    assert not sp.fits(q4.double(), [4, 4, 4])
    assert not sp.fits(q4.half(), [4, 4, 4])
