"""Parity with real diffusers' IPAdapterAttnProcessor2_0 on a diffusers Attention module."""

import pytest
import torch

from harness.testing import require

require("diffusers.models.attention_processor")  # the oracle: fails under CI when missing, never skips there
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0  # noqa: E402

from processors.backends import AttentionOpConfig  # noqa: E402
from processors.diffusers_processor import DiffusersXFormersIPAdapterAttnProcessor  # noqa: E402
from processors.fused import materialized_runner  # noqa: E402
from processors.ip_attention import XFormersIPAdapterAttnProcessor  # noqa: E402

QUERY_DIM, CROSS_DIM, HEADS, DIM_HEAD = 320, 768, 8, 40


def build(scales, num_tokens, attention_op=None):
    torch.manual_seed(0)
    attn = Attention(query_dim=QUERY_DIM, cross_attention_dim=CROSS_DIM, heads=HEADS, dim_head=DIM_HEAD).eval()
    theirs = IPAdapterAttnProcessor2_0(QUERY_DIM, CROSS_DIM, num_tokens=num_tokens, scale=scales)
    for layer in list(theirs.to_k_ip) + list(theirs.to_v_ip):
        torch.nn.init.normal_(layer.weight, std=0.05)
    ours = DiffusersXFormersIPAdapterAttnProcessor(QUERY_DIM, CROSS_DIM, num_tokens=num_tokens, scale=scales,
                                                  attention_op=attention_op)
    ours.load_state_dict(theirs.state_dict())
    return attn, theirs, ours


def inputs(n_adapters, n_images=1, tokens=4, batch=2, size=16):
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(batch, size * size, QUERY_DIM, generator=gen)
    text = torch.randn(batch, 77, CROSS_DIM, generator=gen)
    images = [torch.randn(batch, n_images, tokens, CROSS_DIM, generator=gen) for _ in range(n_adapters)]
    return hidden, (text, images)


def max_error(attn, theirs, ours, hidden, states, **kwargs):
    with torch.no_grad():
        attn.set_processor(theirs)
        expected = attn(hidden, encoder_hidden_states=states, **kwargs)
        attn.set_processor(ours)
        actual = attn(hidden, encoder_hidden_states=states, **kwargs)
    return (actual - expected).abs().max().item()


@pytest.mark.parametrize("scales", [[0.8], [1.0, 0.4], [0.6, 0.0]])
@pytest.mark.parametrize("fused", [False, True])
def test_parity_without_masks(scales, fused):
    attn, theirs, ours = build(scales, [4] * len(scales), AttentionOpConfig(fused=fused))
    error = max_error(attn, theirs, ours, *inputs(len(scales)))
    assert error <= 1e-5


@pytest.mark.parametrize("mask_mode, mask_size", [("multiply output", 32), ("attention bias", 16)])
def test_parity_with_masks(mask_mode, mask_size):
    """Output weighting matches for any mask; in-softmax gating matches where the mask is 0/1 at the token
    grid (a 16x16 mask on 16x16 tokens: diffusers' bicubic downsampling leaves it binary)."""
    attn, theirs, ours = build([0.9, 0.5], [4, 4], AttentionOpConfig(mask_mode=mask_mode))
    hidden, states = inputs(2, n_images=2)
    gen = torch.Generator().manual_seed(2)
    masks = [(torch.rand(1, 2, mask_size, mask_size, generator=gen) > 0.5).float() for _ in range(2)]
    assert max_error(attn, theirs, ours, hidden, states, ip_adapter_masks=masks) <= 1e-5



@pytest.mark.parametrize("scales, masked", [([0.8], False), ([1.0, 0.4], False), ([0.9, 0.5], True)])
def test_fused_packing_matches_diffusers(scales, masked):
    """Fused mode for real: text and every adapter packed into ONE block-diagonal call (xformers'
    BlockDiagonalMask), run on CPU with the bias made dense (processors.fused.materialized_runner) in place of
    the xformers kernel. A spy proves the packed call ran (not the separate calls fused mode falls back to)."""
    require("xformers.ops.fmha")  # the packing needs xformers; under CI its absence fails
    packed_keys = []

    def runner(qp, kp, vp, bias):
        packed_keys.append(kp.shape[1])
        return materialized_runner(qp, kp, vp, bias)

    attn, theirs, ours = build(scales, [4] * len(scales))
    # an explicit xformers op: under auto on CPU the planner may pick the single pass before fused mode
    ours.engine = XFormersIPAdapterAttnProcessor(AttentionOpConfig(op="xformers", fused=True), fused_runner=runner)
    batch, n_images, tokens = 2, 2, 4
    hidden, states = inputs(len(scales), n_images=n_images, tokens=tokens, batch=batch)
    extra = {}
    if masked:
        gen = torch.Generator().manual_seed(2)
        extra["ip_adapter_masks"] = [(torch.rand(1, n_images, 32, 32, generator=gen) > 0.5).float()
                                     for _ in scales]
    assert max_error(attn, theirs, ours, hidden, states, **extra) <= 1e-5
    assert packed_keys == [batch * (77 + len(scales) * n_images * tokens)]

def test_parity_with_text_attention_mask():
    attn, theirs, ours = build([0.7], [4])
    hidden, states = inputs(1)
    keep = torch.ones(2, 77)
    keep[:, 60:] = 0
    additive = (1 - keep) * -10000.0  # how diffusers pipelines pass text masks
    assert max_error(attn, theirs, ours, hidden, states, attention_mask=additive) <= 1e-5


def test_adapter_changes_the_output_and_scale_zero_removes_it():
    attn, theirs, ours = build([1.0], [4])
    hidden, states = inputs(1)
    with torch.no_grad():
        with_adapter = ours(attn, hidden, encoder_hidden_states=states)
        ours.scale = [0.0]
        without = ours(attn, hidden, encoder_hidden_states=states)
    assert (with_adapter - without).abs().max() > 1e-3
