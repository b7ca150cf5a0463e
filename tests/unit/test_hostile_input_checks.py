"""Bad input a hostile user tried (issue 10), at the engine: int8 and truncated adapter files, half-precision and
integer IMAGE batches, masks outside 0..1 and mask batches longer than the latent batch."""
from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

from processors.ip_attention import IPBranch, XFormersIPAdapterAttnProcessor
from processors.ipadapter import IPAdapterFileError, IPAdapterInputError, check_image_batch, load_ipadapter_file
from processors.masks import check_mask
from tests.unit.ipadapter_fixtures import tiny_adapter


# --- adapter files ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32])
@pytest.mark.parametrize("part", ["image_proj", "ip_adapter"])
def test_integer_weights_name_the_dtype_not_a_shape(tmp_path, dtype, part):
    sd = tiny_adapter("base", layout="flat")
    sd = {k: (v * 50).to(dtype) if k.startswith(part) else v for k, v in sd.items()}
    path = tmp_path / "quantized.safetensors"
    save_file(sd, str(path))
    with pytest.raises(IPAdapterFileError) as caught:
        load_ipadapter_file(path)
    message = str(caught.value)
    assert message.startswith("quantized.safetensors: '" + part + ".")
    assert f"has dtype {str(dtype).removeprefix('torch.')}" in message
    assert "float32, float16, bfloat16" in message and "shape" not in message


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_still_load(tmp_path, dtype):
    path = tmp_path / "half.safetensors"
    save_file({k: v.to(dtype) for k, v in tiny_adapter("plus", layout="flat").items()}, str(path))
    model = load_ipadapter_file(path)
    assert model.to_k_ip[0].weight.dtype == dtype


def _truncations(whole: bytes) -> dict[str, bytes]:
    return {"empty": b"", "8 bytes": whole[:8], "header cut": whole[:40], "tensors cut": whole[:len(whole) // 2],
            "not safetensors": b"<html>404 Not Found</html>" * 4}


@pytest.mark.parametrize("case", ["empty", "8 bytes", "header cut", "tensors cut", "not safetensors"])
def test_truncated_safetensors_advise_a_redownload(tmp_path, case):
    whole = tmp_path / "whole.safetensors"
    save_file(tiny_adapter("base", layout="flat"), str(whole))
    path = tmp_path / "ip-adapter_sd15.safetensors"
    data = _truncations(whole.read_bytes())[case]
    path.write_bytes(data)
    with pytest.raises(IPAdapterFileError) as caught:
        load_ipadapter_file(path)
    message = str(caught.value)
    assert message.startswith(f"ip-adapter_sd15.safetensors ({len(data)} bytes)")
    assert "truncated" in message and "not a safetensors file" in message and "re-download it" in message


# --- IMAGE batches --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_float_images_of_other_precisions_become_float32(dtype):
    image = torch.rand(2, 8, 8, 3).to(dtype)
    out = check_image_batch(image)
    assert out.dtype == torch.float32
    assert torch.equal(out, image.to(torch.float32))  # a cast, no rescaling


def test_float32_image_is_passed_through_untouched():
    image = torch.rand(1, 8, 8, 3)
    assert check_image_batch(image) is image


def test_integer_image_is_refused_with_its_dtype():
    with pytest.raises(IPAdapterInputError, match=r"image_negative has dtype torch.uint8; an IMAGE holds floats"):
        check_image_batch(torch.zeros(1, 8, 8, 3, dtype=torch.uint8), "image_negative")


# --- masks ------------------------------------------------------------------------------------------------------

def test_in_range_mask_is_unchanged_and_silent(caplog):
    mask = torch.rand(2, 6, 5)
    with caplog.at_level(logging.INFO, logger="processors.masks"):
        out = check_mask(mask[:1])
    assert torch.equal(out, mask[:1]) and out.dtype == torch.float32
    assert not caplog.records


def test_out_of_range_mask_is_clamped_with_one_warning(caplog):
    mask = torch.tensor([[[7.0, 0.5], [-2.0, 1.0]]])
    with caplog.at_level(logging.WARNING, logger="processors.masks"):
        out = check_mask(mask)
    assert out.tolist() == [[[1.0, 0.5], [0.0, 1.0]]]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["attn_mask values range from -2 to 7; clamped to 0..1 (1 = full adapter effect)"]


def _ip_output(mask_value: float, mask_mode_bias: bool) -> torch.Tensor:
    """One attention call with a uniform mask of `mask_value` as the apply node hands it on (after check_mask)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 16, 32, generator=gen)
    k_ip, v_ip = torch.randn(1, 4, 32, generator=gen), torch.randn(1, 4, 32, generator=gen)
    tokens = check_mask(torch.full((1, 4, 4), mask_value)).flatten(1)  # [1, 16]: one value per query
    if mask_mode_bias:
        from processors.backends import AttentionOpConfig

        processor = XFormersIPAdapterAttnProcessor(AttentionOpConfig(op="sdpa", mask_mode="attention bias"))
    else:
        processor = XFormersIPAdapterAttnProcessor()
    return processor(q, q, q, 2, [IPBranch(k_ip, v_ip, 1.0, tokens)])


@pytest.mark.parametrize("bias", [False, True], ids=["multiply output", "attention bias"])
def test_a_mask_of_seven_acts_as_a_mask_of_one_in_both_modes(bias):
    full, seven, none = _ip_output(1.0, bias), _ip_output(7.0, bias), _ip_output(0.0, bias)
    assert not torch.allclose(full, none)  # the mask does matter here
    torch.testing.assert_close(seven, full)


def test_several_masks_log_the_batch_rule_once(caplog):
    with caplog.at_level(logging.INFO, logger="processors.masks"):
        check_mask(torch.rand(5, 8, 8))
        check_mask(torch.rand(1, 8, 8))  # one mask covers every latent: nothing to explain
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["attn_mask has 5 masks: mask i applies to latent i of the batch; latents beyond the last "
                     "mask reuse it, masks beyond the batch are unused"]
