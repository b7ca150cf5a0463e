"""Operator registry on this CPU machine: declared capabilities, reasons, fallbacks, chunking."""

import sys

import pytest
import torch
import torch.nn.functional as F

from processors import backends, planner, xformers_env
from processors.backends import OP_CHOICES, AttentionOpConfig, UnsupportedOperatorError
from processors.bias import aligned_bias

XFORMERS_OPS = [op for op in OP_CHOICES if op.startswith("xformers")]


@pytest.fixture(autouse=True)
def fresh_run():
    planner.begin_run()


@pytest.fixture
def no_xformers(monkeypatch):
    """xformers made unimportable (None in sys.modules makes `import xformers` fail)."""
    for name in [m for m in sys.modules if m == "xformers" or m.startswith("xformers.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "xformers", None)
    xformers_env.reset()
    yield
    xformers_env.reset()


def qkv(dtype=torch.float32, head_dim=40, batch=2):
    torch.manual_seed(0)
    q = torch.randn(batch, 64, 8, head_dim, dtype=dtype)
    k = torch.randn(batch, 77, 8, head_dim, dtype=dtype)
    return q, k, torch.randn_like(k)


def attention(q, k, v, bias=None, op="auto", batch_limit=None):
    return planner.Planner(AttentionOpConfig(op=op), batch_limit).attention(q, k, v, bias)


def sdpa_reference(q, k, v, bias=None):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_mask=bias).transpose(1, 2)


def test_config_rejects_values_outside_the_contract():
    with pytest.raises(ValueError, match="op must be one of"):
        AttentionOpConfig(op="xformers:magic")
    with pytest.raises(ValueError, match="mask_mode"):
        AttentionOpConfig(mask_mode="bias")
    assert AttentionOpConfig().op == "auto"


@pytest.mark.parametrize("op", XFORMERS_OPS)
def test_every_xformers_operator_is_unavailable_on_cpu_with_a_device_reason(op):
    q, k, v = qkv(torch.float16)
    prepared = backends.prepare(op, q, k, v)
    assert prepared.runner is None
    assert any("cpu" in reason for reason in prepared.reasons), prepared.reasons


def test_library_load_failure_is_explained(monkeypatch):
    """As with a torch that xformers was not built for: its compiled library is missing."""
    import xformers

    monkeypatch.setattr(xformers, "_has_cpp_library", False)
    xformers_env.reset()
    try:
        q, k, v = qkv(torch.float16)
        reasons = backends.prepare("xformers:cutlass", q, k, v).reasons
    finally:
        monkeypatch.undo()
        xformers_env.reset()
    assert any("could not load its compiled library" in r for r in reasons), reasons


def test_auto_runs_sdpa_on_cpu_and_reports_why():
    q, k, v = qkv()
    resolution = planner.resolve("auto", q, k, v)
    assert resolution.ran == "sdpa"
    assert "cpu" in resolution.report() and resolution.report().startswith("attention op 'auto': ran sdpa")
    torch.testing.assert_close(attention(q, k, v), sdpa_reference(q, k, v))


@pytest.mark.usefixtures("no_xformers")
def test_without_xformers_every_xformers_op_says_so_and_auto_runs_sdpa():
    q, k, v = qkv(torch.float16)
    for op in XFORMERS_OPS:
        assert backends.prepare(op, q, k, v).reasons == ("xformers is not installed",
                                                         "device=cpu (xformers runs on cuda only)")
    assert planner.resolve("auto", q, k, v).ran == "sdpa"
    report = backends.operator_report()
    assert report["versions"]["xformers"] is None
    assert all(not o["available"] and "not installed" in o["reason"] for o in report["ops"] if o["name"] in XFORMERS_OPS)


def test_explicit_op_falls_back_or_errors_as_asked():
    q, k, v = qkv()
    resolution = planner.resolve("xformers:flash", q, k, v, on_unsupported="fall back")
    assert resolution.ran == "sdpa" and resolution.fell_back
    assert "xformers:flash" in resolution.report() and "device=cpu" in resolution.report()
    with pytest.raises(UnsupportedOperatorError, match=r"xformers:flash.*device=cpu"):
        planner.resolve("xformers:flash", q, k, v, on_unsupported="error")


def test_sdpa_backends_on_cpu():
    q, k, v = qkv()
    assert backends.prepare("sdpa:math", q, k, v).runner is not None
    for op in ("sdpa:flash", "sdpa:efficient", "sdpa:cudnn"):
        assert "device=cpu (needs cuda)" in backends.prepare(op, q, k, v).reasons
    out = attention(q, k, v, op="sdpa:math")
    torch.testing.assert_close(out, sdpa_reference(q, k, v))


def test_xformers_judges_bias_alignment_through_its_own_checks():
    """cutlass rejects a bias whose row stride is 77; the aligned bias from processors.bias passes."""
    q, k, v = qkv(torch.float16)
    raw = torch.zeros(2, 8, 64, 77, dtype=torch.float16)
    assert any("stride" in r for r in backends.prepare("xformers:cutlass", q, k, v, raw).reasons)
    aligned = aligned_bias(raw, (2, 8, 64, 77), torch.float16, "cpu")
    reasons = backends.prepare("xformers:cutlass", q, k, v, aligned).reasons
    assert not any("stride" in r for r in reasons), reasons
    # flash takes no tensor bias at all: its reasons say so
    assert any("attn_bias" in r for r in backends.prepare("xformers:flash", q, k, v, aligned).reasons)


def test_batches_beyond_the_limit_are_chunked(monkeypatch):
    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **kw: seen.append(q.shape[0]) or real(q, *a, **kw))
    q, k, v = qkv(batch=5)
    bias = aligned_bias(torch.randn(5, 1, 64, 77), (5, 8, 64, 77), torch.float32, "cpu")
    out = attention(q, k, v, bias, batch_limit=2)
    assert seen == [2, 2, 1]
    torch.testing.assert_close(out, sdpa_reference(q, k, v, bias))


def test_operator_report_covers_every_choice():
    report = backends.operator_report()
    assert [o["name"] for o in report["ops"]] == list(OP_CHOICES)
    assert report["versions"]["torch"] == torch.__version__ and report["device"] == "cpu"
    by_name = {o["name"]: o for o in report["ops"]}
    assert by_name["auto"]["available"] and by_name["sdpa"]["available"] and by_name["sdpa:math"]["available"]
    for op in XFORMERS_OPS:
        assert not by_name[op]["available"] and "device=cpu" in by_name[op]["reason"]
    assert all(o["reason"] == "" for o in report["ops"] if o["available"])
