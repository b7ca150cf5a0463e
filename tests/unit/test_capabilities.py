"""Each operator's declared capabilities (processors/backends.py OPERATORS) agree with what xformers and
PyTorch declare; the ops route serves them, and the widget's JS keeps no copy (it reads them from the route)."""
import re
from pathlib import Path

import pytest
import torch

from harness.testing import require
from processors import backends
from processors.backends import OPERATORS

WEB = Path(__file__).resolve().parents[2] / "web"
XFORMERS_MODULES = {"xformers:cutlass": "cutlass", "xformers:flash": "flash", "xformers:flash3": "flash3",
                    "xformers:ck": "ck", "xformers:triton_splitk": "triton_splitk"}


def test_every_choice_is_declared():
    assert list(OPERATORS) == list(backends.OP_CHOICES)


@pytest.mark.parametrize("op", sorted(XFORMERS_MODULES))
def test_xformers_declarations_match_xformers(op):
    fmha = require("xformers.ops.fmha")  # under CI a missing xformers fails this test
    module = getattr(fmha, XFORMERS_MODULES[op])
    types = tuple(module.FwOp.SUPPORTED_ATTN_BIAS_TYPES)
    assert (torch.Tensor in types) == OPERATORS[op].tensor_bias, types
    block_diagonal = any(getattr(t, "__name__", "") == "BlockDiagonalMask" for t in types)
    assert block_diagonal == OPERATORS[op].fused, types


def test_the_dispatcher_and_auto_can_do_what_some_xformers_op_can():
    for op in ("auto", "xformers"):
        assert OPERATORS[op].tensor_bias == any(OPERATORS[x].tensor_bias for x in XFORMERS_MODULES)
        assert OPERATORS[op].fused == any(OPERATORS[x].fused for x in XFORMERS_MODULES)


def test_sdpa_declarations_match_its_checks():
    """No SDPA kernel takes a block-diagonal bias; flash refuses a tensor bias in our checks."""
    q = torch.zeros(1, 4, 2, 8, dtype=torch.float16)
    bias = torch.zeros(1, 2, 4, 4, dtype=torch.float16)
    for op in ("sdpa", "sdpa:flash", "sdpa:efficient", "sdpa:cudnn", "sdpa:math"):
        assert not OPERATORS[op].fused, op
    assert "flash attention takes no tensor bias" in backends._sdpa_static_reasons("sdpa:flash", q, bias)
    assert [op for op in OPERATORS if op.startswith("sdpa") and not OPERATORS[op].tensor_bias] == \
        ["sdpa:flash", "sdpa:cudnn"]
    # the CPU kernels really take the bias they declare
    assert backends.prepare("sdpa:math", q.float(), q.float(), q.float(), bias.float()).runner is not None


def test_the_report_carries_the_declarations():
    for entry in backends.operator_report()["ops"]:
        spec = OPERATORS[entry["name"]]
        assert (entry["tensor_bias"], entry["fused"]) == (spec.tensor_bias, spec.fused), entry


def test_the_widget_keeps_no_capability_table():
    source = (WEB / "ops_logic.js").read_text()
    assert not re.search(r"TENSOR_BIAS|FUSED_OPS", source)
    assert "op.tensor_bias" in source and "op.fused" in source  # read from the route's entries


def js_array(name: str) -> list[str]:
    source = (WEB / "ops_logic.js").read_text()
    match = re.search(rf"export const {name} = Object\.freeze\(\[(.*?)\]\);", source, re.S)
    assert match, f"{name} not found in web/ops_logic.js"
    return re.findall(r'"([^"]*)"', match.group(1))


def test_contract_strings():
    assert js_array("OP_CHOICES") == list(backends.OP_CHOICES)
    assert js_array("MASK_MODES") == list(backends.MASK_MODES)
    assert js_array("ON_UNSUPPORTED") == list(backends.ON_UNSUPPORTED)
