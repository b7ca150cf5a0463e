"""XFormersIPAdapterAttnProcessor against float64 reference maths, on every path it can take on CPU."""

import pytest
import torch

from processors import planner
from processors.backends import AttentionOpConfig
from processors.fused import materialized_runner, pack, unpack
from harness.oracle import reference_attention
from processors.ip_attention import IPBranch, XFormersIPAdapterAttnProcessor

HEADS, DIM = 8, 40
PATHS = {
    "separate": dict(config=AttentionOpConfig()),
    "sdpa:math": dict(config=AttentionOpConfig(op="sdpa:math")),
    "attention bias": dict(config=AttentionOpConfig(mask_mode="attention bias")),
    "fused": dict(config=AttentionOpConfig(fused=True), fused_runner=materialized_runner),
    "chunked": dict(config=AttentionOpConfig(), batch_limit=1),
}


@pytest.fixture(autouse=True)
def fresh_cache():
    planner.begin_run()


def case(batch=2, q_len=64, seed=0, binary_mask=True, row_scale=True):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    inner = HEADS * DIM
    q, k, v = rand(batch, q_len, inner), rand(batch, 77, inner), rand(batch, 77, inner)
    mask = torch.rand(1, q_len, generator=gen, dtype=torch.float64)
    mask = (mask > 0.5).double() if binary_mask else mask
    scale = torch.tensor([1.0, 0.5][:batch], dtype=torch.float64) if row_scale else 0.8
    branches = [
        IPBranch(rand(1, 4, inner), rand(1, 4, inner), 0.7, mask),  # batch-1 K/V, masked
        IPBranch(rand(batch, 16, inner), rand(batch, 16, inner), scale),  # per-row scale
    ]
    return q, k, v, branches


def cast(q, k, v, branches, dtype):
    to = lambda t: t.to(dtype)  # noqa: E731
    return to(q), to(k), to(v), [IPBranch(to(b.k), to(b.v), b.scale, b.mask) for b in branches]


def run(path, q, k, v, branches, **kw):
    params = dict(PATHS[path])
    config = params.pop("config")
    return XFormersIPAdapterAttnProcessor(config, **params)(q, k, v, HEADS, branches, **kw)


@pytest.mark.parametrize("path", list(PATHS))
def test_fp32_matches_float64_reference(path):
    q, k, v, branches = case()
    ref = reference_attention(q, k, v, HEADS, branches)
    out = run(path, *cast(q, k, v, branches, torch.float32))
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert (out.double() - ref).abs().max().item() <= 1e-5


@pytest.mark.parametrize("path", ["separate", "fused", "attention bias"])
def test_bf16_within_two_percent(path):
    q, k, v, branches = case()
    ref = reference_attention(q, k, v, HEADS, branches)
    out = run(path, *cast(q, k, v, branches, torch.bfloat16))
    assert out.dtype == torch.bfloat16
    relative = (out.double() - ref).abs().max() / ref.abs().max()
    assert relative.item() <= 2e-2


def test_fp32_precision_upcasts_half_inputs():
    q, k, v, branches = case()
    ref = reference_attention(q, k, v, HEADS, branches)
    half = cast(q, k, v, branches, torch.bfloat16)
    plain = run("separate", *half)
    upcast = run("separate", *half, precision=torch.float32)
    assert upcast.dtype == torch.bfloat16
    err = lambda out: (out.double() - ref).abs().max().item()  # noqa: E731
    assert err(upcast) < err(plain)


def test_scale_zero_equals_text_only_and_one_zero_equals_one_adapter():
    q, k, v, (a, b) = cast(*case(), torch.float32)
    processor = XFormersIPAdapterAttnProcessor()
    text_only = processor(q, k, v, HEADS, [])
    assert torch.equal(processor(q, k, v, HEADS, [IPBranch(a.k, a.v, 0.0, a.mask)]), text_only)
    one = processor(q, k, v, HEADS, [a])
    two = processor(q, k, v, HEADS, [a, IPBranch(b.k, b.v, 0.0)])
    torch.testing.assert_close(two, one, rtol=0, atol=1e-6)
    assert (one - text_only).abs().max() > 1e-2  # the adapter does change the output


def test_attention_bias_mode_equals_output_weighting_for_binary_masks_and_gates_fractional_ones():
    q, k, v, branches = cast(*case(), torch.float32)
    multiply = run("separate", q, k, v, branches)
    in_softmax = run("attention bias", q, k, v, branches)
    torch.testing.assert_close(in_softmax, multiply, rtol=0, atol=1e-5)
    soft = [IPBranch(branches[0].k, branches[0].v, 0.7, torch.full_like(branches[0].mask, 0.5))]
    out_multiply = run("separate", q, k, v, soft)
    out_bias = run("attention bias", q, k, v, soft)
    text_only = run("separate", q, k, v, [])
    assert (out_bias - out_multiply).abs().max() > 1e-4  # soft gating is not a plain multiply...
    assert (out_bias - text_only).abs().max() > 1e-4  # ...but still adds the adapter partly


def test_all_zero_mask_equals_text_only_in_both_modes():
    q, k, v, branches = cast(*case(), torch.float32)
    zero = [IPBranch(b.k, b.v, b.scale, torch.zeros(1, q.shape[1])) for b in branches]
    text_only = run("separate", q, k, v, [])
    for path in ("separate", "attention bias"):
        torch.testing.assert_close(run(path, q, k, v, zero), text_only, rtol=0, atol=1e-6)


def sdpa_math(q4, k4, v4):
    return planner.Planner(AttentionOpConfig(op="sdpa:math")).attention(q4, k4, v4)


def test_fused_packing_equals_separate_calls():
    """The packing code of the GPU path, run against the dense materialized block-diagonal bias."""
    q, k, v, branches = cast(*case(batch=3, q_len=40), torch.float32)
    q4 = q.view(3, 40, HEADS, DIM)
    keys = [k.view(3, -1, HEADS, DIM)] + [b.k.view(b.k.shape[0], -1, HEADS, DIM).expand(3, -1, -1, -1) for b in branches]
    values = [v.view(3, -1, HEADS, DIM)] + [b.v.view(b.v.shape[0], -1, HEADS, DIM).expand(3, -1, -1, -1) for b in branches]
    bias, qp, kp, vp = pack(q4, keys, values)
    assert qp.shape == (1, 3 * 3 * 40, HEADS, DIM) and kp.shape[1] == 3 * (77 + 4 + 16)
    outs = unpack(bias, materialized_runner(qp, kp, vp, bias))
    for out, key, value in zip(outs, keys, values):
        torch.testing.assert_close(out, sdpa_math(q4, key, value), rtol=0, atol=1e-5)
    # and the joint softmax over all keys is NOT what we compute
    joint = sdpa_math(q4, torch.cat(keys, 1), torch.cat(values, 1))
    assert (joint - outs[0]).abs().max() > 1e-2


def test_fused_mode_without_xformers_kernels_falls_back_to_separate_calls(caplog):
    q, k, v, branches = cast(*case(), torch.float32)
    processor = XFormersIPAdapterAttnProcessor(AttentionOpConfig(fused=True))
    with caplog.at_level("WARNING"):
        out = processor(q, k, v, HEADS, branches)
        processor(q, k, v, HEADS, branches)
    assert sum("fused attention not possible" in r.message for r in caplog.records) == 1
    torch.testing.assert_close(out, run("separate", q, k, v, branches), rtol=0, atol=1e-6)


def test_keys_from_several_images_fold_into_the_query_batch():
    """K/V with batch n*B are folded into the token axis by the query's batch (ComfyUI's concat semantics)."""
    q, k, v, _ = cast(*case(), torch.float32)
    gen = torch.Generator().manual_seed(3)
    ki, vi = torch.randn(4, 4, HEADS * DIM, generator=gen), torch.randn(4, 4, HEADS * DIM, generator=gen)
    folded = XFormersIPAdapterAttnProcessor()(q, k, v, HEADS, [IPBranch(ki, vi)])
    explicit = XFormersIPAdapterAttnProcessor()(q, k, v, HEADS, [IPBranch(ki.reshape(2, 8, -1), vi.reshape(2, 8, -1))])
    torch.testing.assert_close(folded, explicit)
    with pytest.raises(ValueError, match="not 1 or a multiple of the query batch"):
        XFormersIPAdapterAttnProcessor()(q, k, v, HEADS, [IPBranch(ki[:3], vi[:3])])


def test_base_output_replaces_the_text_attention():
    """A foreign attention's output is kept as is and the adapters are added to it."""
    q, k, v, branches = cast(*case(), torch.float32)
    processor = XFormersIPAdapterAttnProcessor()
    base = torch.randn_like(q)
    with_base = processor(q, k, v, HEADS, branches, base=base)
    ours = processor(q, k, v, HEADS, branches)
    text_only = processor(q, k, v, HEADS, [])
    torch.testing.assert_close(with_base - base, ours - text_only, rtol=0, atol=1e-5)
    assert torch.equal(processor(q, k, v, HEADS, [], base=base), base)
