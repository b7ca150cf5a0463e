"""The planner on this CPU machine: one decision per signature, logged once per run, never a crash while
deciding, fused mode's obstacles (a warning, or an error when asked), and the checks the nodes run."""

import pytest
import torch

from harness.oracle import reference_attention
from harness.testing import require
from processors import backends, planner
from processors.backends import AttentionOpConfig, UnsupportedOperatorError
from processors.fused import materialized_runner
from processors.ip_attention import IPBranch, XFormersIPAdapterAttnProcessor

HEADS, DIM = 4, 16


@pytest.fixture(autouse=True)
def fresh_run():
    planner.begin_run()


def bmhk(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def request(batch=2, queries=64, lengths=(77, 4), dtype=torch.float32):
    q = bmhk(batch, queries, HEADS, DIM, dtype=dtype)
    keys = [bmhk(batch, n, HEADS, DIM, seed=i + 1, dtype=dtype) for i, n in enumerate(lengths)]
    return q, keys, [k.flip(1) for k in keys], [None] * len(keys)


def count_prepares(monkeypatch) -> list[str]:
    calls = []
    real = backends.prepare
    monkeypatch.setattr(backends, "prepare", lambda *a, **kw: calls.append(a[0]) or real(*a, **kw))
    return calls


def test_a_plan_is_made_once_per_signature(monkeypatch):
    calls = count_prepares(monkeypatch)
    plans = planner.Planner()
    q, keys, values, biases = request()
    first = plans.plan(q, keys, values, biases)
    for _ in range(5):
        assert plans.plan(q, keys, values, biases) is first
    assert calls == ["xformers", "sdpa", "xformers", "sdpa"]  # text and image attention, once
    plans.plan(*request(queries=32))  # another signature is planned again
    assert len(calls) == 8


def test_plans_are_bounded(monkeypatch):
    monkeypatch.setattr(planner, "PLAN_CAPACITY", 4)
    plans = planner.Planner()
    for queries in range(1, 10):
        plans.plan(*request(queries=queries, lengths=(3,)))
    assert len(plans._plans) == 4


def test_each_report_line_is_logged_once_per_run(caplog):
    plans = planner.Planner(AttentionOpConfig(op="xformers:cutlass"))
    q, keys, values, biases = request()
    with caplog.at_level("INFO", logger="processors.planner"):
        for _ in range(3):
            plans.plan(q, keys, values, biases)
        planner.Planner(AttentionOpConfig(op="xformers:cutlass")).plan(q, keys, values, biases)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "ran sdpa because xformers:cutlass" in warnings[0].message
    assert planner.run_reports() == [warnings[0].message]
    planner.begin_run()
    with caplog.at_level("INFO", logger="processors.planner"):
        plans.plan(q, keys, values, biases)
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 2  # a new run logs it again


def test_a_failing_private_xformers_function_is_a_reason_not_a_crash(monkeypatch):
    """xformers' dispatcher list is private API: if it breaks, auto and 'fall back' still run SDPA."""
    fmha = require("xformers.ops.fmha")

    def renamed(*args, **kwargs):
        raise AttributeError("module 'xformers.ops.fmha.dispatch' has no attribute '_dispatch_fw_priority_list'")

    monkeypatch.setattr(fmha.dispatch, "_dispatch_fw_priority_list", renamed)
    q, keys, values, _ = request(lengths=(77,))
    resolution = planner.resolve("auto", q, keys[0], values[0])
    assert resolution.ran == "sdpa"
    assert "checking xformers failed: AttributeError" in resolution.report()
    out = planner.Planner(AttentionOpConfig(op="xformers")).attention(q, keys[0], values[0])
    assert torch.isfinite(out).all()
    with pytest.raises(UnsupportedOperatorError, match="checking xformers failed"):
        planner.resolve("xformers", q, keys[0], values[0], on_unsupported="error")


def test_any_failing_check_is_a_reason(monkeypatch):
    def broken(*args):
        raise KeyError("renamed")

    monkeypatch.setattr(backends, "_sdpa_static_reasons", broken)
    q, keys, values, _ = request(lengths=(77,))
    prepared = backends.prepare("sdpa:efficient", q, keys[0], values[0])
    assert prepared.runner is None and prepared.reasons == ("checking sdpa:efficient failed: KeyError: 'renamed'",)


class CudaLike:
    """Stands for a CUDA tensor where this CPU machine has none: what the SDPA checks read of one."""

    device, dtype, shape = torch.device("cuda"), torch.float16, (2, 64, HEADS, DIM)

    def transpose(self, *dims):
        return self


def test_a_changed_private_torch_check_is_a_reason(monkeypatch):
    """torch.backends.cuda.SDPAParams is private API: a changed signature rejects the kernel it guards (with
    the reason), and plain sdpa, which needs no such check, still runs."""
    def changed(*args):
        raise TypeError("SDPAParams() takes 8 positional arguments but 7 were given")

    monkeypatch.setattr(torch.backends.cuda, "SDPAParams", changed)
    fake = CudaLike()
    prepared = backends.prepare("sdpa:efficient", fake, fake, fake)
    assert prepared.runner is None
    assert prepared.reasons == ("checking sdpa:efficient failed: TypeError: SDPAParams() takes 8 positional "
                                "arguments but 7 were given",)
    assert backends.prepare("sdpa", fake, fake, fake).runner is not None


def test_a_failing_fused_packing_is_a_reason(monkeypatch, caplog):
    fmha = require("xformers.ops.fmha")
    monkeypatch.setattr(fmha.BlockDiagonalMask, "from_tensor_lists_qkv",
                        classmethod(lambda cls, *a, **kw: (_ for _ in ()).throw(RuntimeError("new signature"))))
    with caplog.at_level("WARNING", logger="processors.planner"):
        plan = planner.Planner(AttentionOpConfig(fused=True)).plan(*request())
    assert plan.formulation == planner.SEPARATE
    assert "packing failed: RuntimeError: new signature" in plan.report


def test_fused_without_an_xformers_kernel_runs_separate_calls_and_says_why_once(caplog):
    plans = planner.Planner(AttentionOpConfig(op="xformers:cutlass", fused=True))
    with caplog.at_level("WARNING", logger="processors.planner"):
        for _ in range(3):
            plan = plans.plan(*request())
    assert plan.formulation == planner.SEPARATE and len(plan.runners) == 2
    fused_lines = [r.message for r in caplog.records if "fused attention not possible" in r.message]
    assert len(fused_lines) == 1 and "device=cpu" in fused_lines[0]


@pytest.mark.parametrize("op", ["xformers:triton_splitk", "sdpa", "sdpa:math", "xformers:cutlass"])
def test_fused_with_on_unsupported_error_stops(op):
    config = AttentionOpConfig(op=op, fused=True, on_unsupported="error")
    with pytest.raises(UnsupportedOperatorError, match="fused mode cannot run"):
        planner.Planner(config).plan(*request())


def test_fused_packing_runs_as_one_call_through_a_materialized_bias():
    """The planner picks the fused formulation, and the packed call equals the separate attentions."""
    processor = XFormersIPAdapterAttnProcessor(AttentionOpConfig(fused=True), fused_runner=materialized_runner)
    gen = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 64, HEADS * DIM, generator=gen) for _ in range(3))
    branches = [IPBranch(torch.randn(1, 4, HEADS * DIM, generator=gen), torch.randn(1, 4, HEADS * DIM, generator=gen),
                         0.7),
                IPBranch(torch.randn(2, 16, HEADS * DIM, generator=gen), torch.randn(2, 16, HEADS * DIM, generator=gen),
                         torch.tensor([1.0, -0.5]))]
    out = processor(q, k, v, HEADS, branches)
    assert any(line.startswith("fused attention (3 attentions)") for line in planner.run_reports())
    assert (out.double() - reference_attention(q, k, v, HEADS, branches)).abs().max().item() <= 1e-5


def test_adapters_without_the_text_attention_get_one_runner_each():
    """A host that computes the text (or joint) attention itself asks for the adapters only."""
    q, keys, values, biases = request(lengths=(4, 16))
    plan = planner.Planner().plan(q, keys, values, biases, has_text=False)
    assert plan.formulation == planner.SEPARATE and len(plan.runners) == 2


# --- the checks at the node -----------------------------------------------------------------------------------

CPU = torch.device("cpu")


def test_check_config():
    planner.check_config(AttentionOpConfig(op="sdpa:math", on_unsupported="error"), CPU)
    planner.check_config(AttentionOpConfig(op="xformers:cutlass"), CPU)  # fall back: nothing to check
    with pytest.raises(UnsupportedOperatorError, match=r"'xformers:cutlass' cannot run on this machine"):
        planner.check_config(AttentionOpConfig(op="xformers:cutlass", on_unsupported="error"), CPU)
    with pytest.raises(UnsupportedOperatorError, match=r"fused mode needs an op .* 'sdpa:math' does not"):
        planner.check_config(AttentionOpConfig(op="sdpa:math", fused=True, on_unsupported="error"), CPU)


def test_check_model_plans_as_sampling_will():
    shapes = [(8, 40), (8, 80)]
    planner.check_model(AttentionOpConfig(op="sdpa:math", on_unsupported="error"), CPU, torch.float32, shapes)
    planner.check_model(AttentionOpConfig(op="sdpa", mask_mode="attention bias", on_unsupported="error"), CPU,
                        torch.float32, shapes, masked=True)
    with pytest.raises(UnsupportedOperatorError, match="'sdpa:flash' cannot run these inputs"):
        planner.check_model(AttentionOpConfig(op="sdpa:flash", on_unsupported="error"), CPU, torch.float16, shapes)
    with pytest.raises(UnsupportedOperatorError, match="fused mode cannot run"):
        planner.check_model(AttentionOpConfig(op="sdpa", fused=True, on_unsupported="error"), CPU, torch.float32,
                            shapes)
    assert planner.run_reports() == []  # checking logs nothing


# --- what the processor derives from its inputs is made once ---------------------------------------------------

def test_mask_bias_and_null_token_are_derived_once_per_input(monkeypatch):
    import processors.ip_attention as ipa

    calls = []
    real = ipa.mask_bias
    monkeypatch.setattr(ipa, "mask_bias", lambda *a: calls.append(a[1:]) or real(*a))
    processor = XFormersIPAdapterAttnProcessor(AttentionOpConfig(mask_mode="attention bias"))
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, 64, HEADS * DIM, generator=gen) for _ in range(3))
    mask = (torch.rand(1, 64, generator=gen) > 0.5).float()
    branch = IPBranch(torch.randn(1, 4, HEADS * DIM, generator=gen), torch.randn(1, 4, HEADS * DIM, generator=gen),
                      0.8, mask)
    outs = [processor(q, k, v, HEADS, [branch]) for _ in range(4)]
    assert len(calls) == 1 and len(processor.held_tensors()) == 3  # bias, K and V with the null token
    assert all(torch.equal(o, outs[0]) for o in outs)
    torch.testing.assert_close(outs[0].double(), reference_attention(q, k, v, HEADS, [branch]), atol=1e-5, rtol=0)
    del branch, mask
    import gc

    gc.collect()
    assert processor.held_tensors() == []  # gone with the inputs they were derived from
