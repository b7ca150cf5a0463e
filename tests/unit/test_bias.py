"""Properties of the aligned bias builder: any mask shape and dtype."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.bias import aligned_bias, alignment, is_aligned

DTYPES = [torch.float16, torch.bfloat16, torch.float32]


@st.composite
def masks(draw):
    batch, heads = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    q_len, k_len = draw(st.integers(1, 12)), draw(st.integers(1, 40))
    ndim = draw(st.sampled_from([2, 3, 4]))
    shape = [batch if draw(st.booleans()) else 1, heads if draw(st.booleans()) else 1,
             q_len if draw(st.booleans()) else 1, k_len][4 - ndim:]
    if ndim == 3:
        shape[0] = batch if draw(st.booleans()) else 1
    kind = draw(st.sampled_from(["bool", "float16", "float32", "float64"]))
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    if kind == "bool":
        values = torch.rand(shape, generator=gen) > 0.3
    else:
        values = (torch.randn(shape, generator=gen) * 4).to(getattr(torch, kind))
    return values, (batch, heads, q_len, k_len), draw(st.sampled_from(DTYPES))


def expected_dense(values, shape, dtype):
    """What the bias must equal: bool keep-masks as 0/-inf, floats cast, broadcast the ComfyUI way."""
    while values.ndim < 4:
        values = values.unsqueeze(1 if values.ndim == 3 else 0)
    if values.dtype == torch.bool:
        values = torch.zeros(values.shape).masked_fill(~values, float("-inf"))
    return values.to(dtype).expand(shape)


@settings(max_examples=150, deadline=None)
@given(masks())
def test_aligned_bias_values_dtype_and_strides(case):
    values, shape, dtype = case
    bias = aligned_bias(values, shape, dtype, "cpu")
    assert bias.shape == shape and bias.dtype == dtype
    assert bias.stride(-1) == 1
    assert all(s % alignment(dtype) == 0 for s in bias.stride()[:-1]), bias.stride()
    assert alignment(dtype) == (4 if dtype == torch.float32 else 8)
    assert is_aligned(bias)
    assert torch.equal(bias, expected_dense(values, shape, dtype))


def test_unaligned_bias_is_detected():
    assert not is_aligned(torch.zeros(1, 1, 5, 77, dtype=torch.float16))
    assert is_aligned(torch.zeros(1, 1, 5, 80, dtype=torch.float16)[..., :77])


def test_bad_mask_shapes_are_named():
    import pytest

    with pytest.raises(ValueError, match="2 to 4 dims"):
        aligned_bias(torch.zeros(7), (1, 1, 1, 7), torch.float32, "cpu")
    with pytest.raises(ValueError, match="has 5 keys; the attention has 7"):
        aligned_bias(torch.zeros(3, 5), (1, 1, 3, 7), torch.float32, "cpu")
    with pytest.raises(ValueError, match="does not broadcast"):
        aligned_bias(torch.zeros(2, 3, 7), (4, 1, 3, 7), torch.float32, "cpu")
