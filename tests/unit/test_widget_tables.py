"""The widget's tables in web/ops_logic.js agree with the engine: the op/mask/on_unsupported strings are the
contract's, and the ops that take a tensor bias or a block-diagonal mask are what xformers declares."""
import re
from pathlib import Path

import pytest
import torch

from harness.testing import require
from processors import backends

SOURCE = (Path(__file__).resolve().parents[2] / "web" / "ops_logic.js").read_text()


def js_array(name: str) -> list[str]:
    match = re.search(rf"export const {name} = Object\.freeze\(\[(.*?)\]\);", SOURCE, re.S)
    assert match, f"{name} not found in web/ops_logic.js"
    return re.findall(r'"([^"]*)"', match.group(1))


def test_contract_strings():
    assert js_array("OP_CHOICES") == list(backends.OP_CHOICES)
    assert js_array("MASK_MODES") == list(backends.MASK_MODES)
    assert js_array("ON_UNSUPPORTED") == list(backends.ON_UNSUPPORTED)


XFORMERS_MODULES = {"xformers:cutlass": "cutlass", "xformers:flash": "flash", "xformers:flash3": "flash3",
                    "xformers:ck": "ck", "xformers:triton_splitk": "triton_splitk"}


@pytest.mark.parametrize("op", sorted(XFORMERS_MODULES))
def test_xformers_bias_support_matches(op):
    fmha = require("xformers.ops.fmha")
    module = getattr(fmha, XFORMERS_MODULES[op], None)
    assert module is not None, f"this xformers has no {op}: the op list names a kernel it does not ship"
    types = tuple(module.FwOp.SUPPORTED_ATTN_BIAS_TYPES)
    assert (torch.Tensor in types) == (op in js_array("TENSOR_BIAS_OPS")), types
    block_diagonal = any(getattr(t, "__name__", "") == "BlockDiagonalMask" for t in types)
    assert block_diagonal == (op in js_array("FUSED_OPS")), types


def test_sdpa_rules_match():
    bias_ops = js_array("TENSOR_BIAS_OPS")
    q = torch.zeros(1, 4, 2, 8, dtype=torch.float16)
    bias = torch.zeros(1, 2, 4, 4, dtype=torch.float16)
    for op in ("sdpa", "sdpa:flash", "sdpa:efficient", "sdpa:cudnn", "sdpa:math"):
        assert op not in js_array("FUSED_OPS")  # SDPA takes no block-diagonal bias
        flash_rejects = op == "sdpa:flash" and "flash attention takes no tensor bias" in \
            backends._sdpa_static_reasons(op, q, bias)
        if op == "sdpa:flash":
            assert flash_rejects
        assert (op in bias_ops) == (op not in ("sdpa:flash", "sdpa:cudnn")), op
