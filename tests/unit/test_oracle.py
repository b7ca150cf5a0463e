"""The float64 oracle (scripts/harness/oracle.py) is itself right: hand-computed tiny cases, and PyTorch SDPA.

The expected numbers below were worked out by hand from softmax(q k^T / sqrt(d)) v; with keys chosen so the
scores are 0 and log(3), the softmax weights are 1/4 and 3/4 exactly.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from harness.oracle import reference_attention

LN3 = math.log(3.0)


class Branch:
    """An IPBranch-like object: the oracle reads k, v, scale, mask by attribute."""

    def __init__(self, k, v, scale=1.0, mask=None):
        self.k, self.v, self.scale, self.mask = k, v, scale, mask


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_one_head_two_keys_by_hand():
    """d = 1. Query 1 scores the text keys [0, ln 3] -> weights [1/4, 3/4] -> 1/4*4 + 3/4*8 = 7.
    Query 2 (q = 2) scores [0, 2 ln 3] -> weights [1/10, 9/10] -> 0.4 + 7.2 = 7.6.
    Image keys are 0 -> uniform weights -> (2 + 6) / 2 = 4 for both queries; scale 0.5 and mask [1, 0]
    add 0.5 * 4 = 2 to query 1 only: [9, 7.6]."""
    q = t([[1.0], [2.0]])  # [B=1, Mq=2, H*D=1]
    k, v = t([[0.0], [LN3]]), t([[4.0], [8.0]])
    image = Branch(t([[0.0], [0.0]]), t([[2.0], [6.0]]), scale=0.5, mask=t([1.0, 0.0]))
    text_only = reference_attention(q, k, v, heads=1)
    out = reference_attention(q, k, v, heads=1, branches=[image])
    assert out.dtype == torch.float64 and out.shape == (1, 2, 1)
    torch.testing.assert_close(text_only.flatten(), t(7.0, 7.6), rtol=0, atol=1e-12)
    torch.testing.assert_close(out.flatten(), t(9.0, 7.6), rtol=0, atol=1e-12)


def test_heads_split_the_channels_and_scores_use_the_head_width():
    """H = 2, D = 4: channels 0-3 are head 0, 4-7 head 1. Head 0: q = [2 ln 3, 0, 0, 0], keys e0 * [0, 1]
    -> scores [0, 2 ln 3 / sqrt(4)] = [0, ln 3] -> weights [1/4, 3/4]. Head 1: q = 0 -> weights [1/2, 1/2]."""
    q = torch.zeros(1, 1, 8, dtype=torch.float64)
    q[0, 0, 0] = 2 * LN3
    k = torch.zeros(1, 2, 8, dtype=torch.float64)
    k[0, 1, 0] = 1.0
    v = torch.zeros(1, 2, 8, dtype=torch.float64)
    v[0, :, 0] = t(4.0, 8.0)  # head 0, first channel
    v[0, :, 4] = t(4.0, 8.0)  # head 1, first channel
    out = reference_attention(q, k, v, heads=2).flatten()
    expected = torch.zeros(8, dtype=torch.float64)
    expected[0], expected[4] = 0.25 * 4 + 0.75 * 8, 0.5 * 4 + 0.5 * 8
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)


def test_folded_images_per_row_scales_and_batch_one_text():
    """B = 2, image K/V with 4 rows of 1 token: rows 0-1 are batch row 0's two images, rows 2-3 row 1's.
    Zero keys -> uniform weights: row 0 gets (2 + 6) / 2 = 4, row 1 gets (10 + 20) / 2 = 15; scales [1, 0.5].
    Text K/V of batch 1 (zero keys, values 1 and 3) is shared: 2 for both rows. Out: [2 + 4, 2 + 7.5]."""
    q = torch.ones(2, 1, 1, dtype=torch.float64)
    k, v = t([[0.0], [0.0]]), t([[1.0], [3.0]])
    image = Branch(torch.zeros(4, 1, 1, dtype=torch.float64), t([[2.0]], [[6.0]], [[10.0]], [[20.0]]),
                   scale=t(1.0, 0.5))
    out = reference_attention(q, k, v, heads=1, branches=[image]).flatten()
    torch.testing.assert_close(out, t(6.0, 9.5), rtol=0, atol=1e-12)


def test_value_width_may_differ_from_key_width():
    q = torch.zeros(1, 1, 2, dtype=torch.float64)  # 1 head, D = 2, uniform weights over 2 keys
    k = torch.zeros(1, 2, 2, dtype=torch.float64)
    v = t([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])
    torch.testing.assert_close(reference_attention(q, k, v, heads=1).flatten(), t(2.0, 3.0, 4.0))


def test_rejects_a_key_batch_that_does_not_fold():
    q = torch.zeros(2, 1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="multiple"):
        reference_attention(q, torch.zeros(3, 2, 4), torch.zeros(3, 2, 4), heads=1)


@pytest.mark.parametrize("text_batch", [1, 2])
def test_without_adapters_equals_pytorch_sdpa(text_batch):
    heads, dim = 8, 40
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 64, heads * dim, generator=gen, dtype=torch.float64)
    k = torch.randn(text_batch, 77, heads * dim, generator=gen, dtype=torch.float64)
    v = torch.randn(text_batch, 77, heads * dim, generator=gen, dtype=torch.float64)
    bhnd = lambda x: x.expand(2, -1, -1).reshape(2, x.shape[1], heads, dim).transpose(1, 2)  # noqa: E731
    expected = F.scaled_dot_product_attention(bhnd(q), bhnd(k), bhnd(v)).transpose(1, 2).reshape(q.shape)
    torch.testing.assert_close(reference_attention(q, k, v, heads), expected, rtol=0, atol=1e-12)


def test_accepts_lower_precision_inputs_and_computes_in_float64():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 8, 16, generator=gen) for _ in range(3))
    out = reference_attention(q, k, v, heads=2)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, reference_attention(q.double(), k.double(), v.double(), heads=2))
