"""Attention operator registry: every `op` choice, what it declares it supports, and why it cannot run.

Each operator declares its capabilities (`OPERATORS`: whether it takes a tensor bias, whether it can run the
block-diagonal fused call) and answers, for concrete inputs, either a runner or the reasons it cannot run
(xformers' own `not_supported_reasons` where it applies). Deciding never raises: whatever goes wrong while
asking becomes a reason. Which operator and formulation actually run is the planner's decision
(`planner.py`), the only caller of `prepare`. Tensors are in xformers' BMHK layout: q `[B, Mq, H, D]`,
k/v `[B, Mk, H, D]`, bias `None`, an additive tensor broadcast to `[B, H, Mq, Mk]` (see `bias.py`) or an
xformers `BlockDiagonalMask`.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .xformers_env import xformers_status

logger = logging.getLogger(__name__)

OP_CHOICES: tuple[str, ...] = (
    "auto", "xformers", "xformers:cutlass", "xformers:flash", "xformers:flash3", "xformers:ck",
    "xformers:triton_splitk", "sdpa", "sdpa:flash", "sdpa:efficient", "sdpa:cudnn", "sdpa:math",
)
MASK_MODES: tuple[str, ...] = ("multiply output", "attention bias")
ON_UNSUPPORTED: tuple[str, ...] = ("fall back", "error")

# CUDA grid limit on the batch axis (xformers issue 845); SDPA has had trouble above 2**15 (ComfyUI chunks there).
XFORMERS_BATCH_LIMIT = 65535
SDPA_BATCH_LIMIT = 2**15

Runner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, Any], torch.Tensor]


class UnsupportedOperatorError(RuntimeError):
    """The requested operator cannot run these inputs and `on_unsupported` is "error"."""


def _check_choice(name: str, value: Any, allowed: Sequence[Any]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


@dataclass(frozen=True)
class AttentionOpConfig:
    """What SelectXformersAttentionOp outputs: the operator and how masks and adapters are computed."""

    op: str = "auto"
    mask_mode: str = "multiply output"
    fused: bool = False
    on_unsupported: str = "fall back"

    def __post_init__(self) -> None:
        _check_choice("op", self.op, OP_CHOICES)
        _check_choice("mask_mode", self.mask_mode, MASK_MODES)
        _check_choice("on_unsupported", self.on_unsupported, ON_UNSUPPORTED)
        if not isinstance(self.fused, bool):
            raise ValueError(f"fused must be a bool; got {self.fused!r}")


# --------------------------------------------------------------------------------------------------------------
# Bias kinds and signatures


def bias_kind(bias: Any) -> str:
    if bias is None:
        return "none"
    if isinstance(bias, torch.Tensor):
        return "tensor"
    if type(bias).__name__.startswith("BlockDiagonal"):
        return "block-diagonal"
    return type(bias).__name__



# --------------------------------------------------------------------------------------------------------------
# Declared capabilities (served to the widget by the ops route; checked against xformers by the tests)


@dataclass(frozen=True)
class OperatorSpec:
    name: str
    tensor_bias: bool  # takes an additive tensor bias: mask_mode "attention bias" can run on it
    fused: bool  # takes xformers' BlockDiagonalMask: fused mode can run on it


OPERATORS: dict[str, OperatorSpec] = {spec.name: spec for spec in (
    OperatorSpec("auto", tensor_bias=True, fused=True),  # xformers where it can, else SDPA
    OperatorSpec("xformers", tensor_bias=True, fused=True),  # the dispatcher picks an op that does
    OperatorSpec("xformers:cutlass", tensor_bias=True, fused=True),
    OperatorSpec("xformers:flash", tensor_bias=False, fused=True),
    OperatorSpec("xformers:flash3", tensor_bias=False, fused=True),
    OperatorSpec("xformers:ck", tensor_bias=True, fused=True),
    OperatorSpec("xformers:triton_splitk", tensor_bias=True, fused=False),
    OperatorSpec("sdpa", tensor_bias=True, fused=False),  # PyTorch SDPA takes no block-diagonal bias
    OperatorSpec("sdpa:flash", tensor_bias=False, fused=False),
    OperatorSpec("sdpa:efficient", tensor_bias=True, fused=False),
    OperatorSpec("sdpa:cudnn", tensor_bias=False, fused=False),
    OperatorSpec("sdpa:math", tensor_bias=True, fused=False),
)}
FUSED_OPS = tuple(name for name, spec in OPERATORS.items() if spec.fused)


# --------------------------------------------------------------------------------------------------------------
# Operators


@dataclass(frozen=True)
class Prepared:
    """An operator bound to an input signature: a runner, or why it cannot run."""

    name: str
    runner: Optional[Runner]
    reasons: tuple[str, ...] = ()
    detail: str = ""  # e.g. which xformers kernel its dispatcher picked


def _chunked(run: Runner, limit: int) -> Runner:
    """Split the batch so no kernel launch exceeds the grid limit."""

    def chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Any) -> torch.Tensor:
        batch = q.shape[0]
        if batch <= limit:
            return run(q, k, v, bias)
        parts = []
        for start in range(0, batch, limit):
            stop = min(start + limit, batch)
            part_bias = bias[start:stop] if isinstance(bias, torch.Tensor) else bias
            parts.append(run(q[start:stop], k[start:stop], v[start:stop], part_bias))
        return torch.cat(parts)

    return chunked


_XFORMERS_FW_OPS: dict[str, tuple[str, str]] = {
    # op choice -> (fmha submodule, class)
    "xformers:cutlass": ("cutlass", "FwOp"),
    "xformers:flash": ("flash", "FwOp"),
    "xformers:flash3": ("flash3", "FwOp"),
    "xformers:ck": ("ck", "FwOp"),
    "xformers:triton_splitk": ("triton_splitk", "FwOp"),
}


def _xformers_inputs(fmha: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Any) -> Any:
    inp = fmha.Inputs(query=q, key=k, value=v, attn_bias=bias)
    inp.validate_inputs()
    return inp


def _xformers_runner(fmha: Any, fw_op: Any, batch_limit: int) -> Runner:
    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Any) -> torch.Tensor:
        return fmha.memory_efficient_attention_forward(q, k, v, attn_bias=bias, op=fw_op)

    return _chunked(run, batch_limit)


def _with_library_problem(reasons: list[str], problem: str) -> tuple[str, ...]:
    return tuple(reasons + [problem]) if problem else tuple(reasons)


def _without_xformers(choice: str, q: torch.Tensor, problem: str) -> Prepared:
    """xformers cannot be used at all; say so, and say when the device would rule it out anyway."""
    device = () if q.device.type == "cuda" else (f"device={q.device.type} (xformers runs on cuda only)",)
    return Prepared(choice, None, (problem, *device))


def _prepare_xformers_op(choice: str, q, k, v, bias, batch_limit: int) -> Prepared:
    status = xformers_status()
    if not status.importable:
        return _without_xformers(choice, q, status.problem)
    module_name, class_name = _XFORMERS_FW_OPS[choice]
    fw_op = getattr(getattr(status.fmha, module_name, None), class_name, None)
    if fw_op is None:
        return Prepared(choice, None, (f"this xformers has no {module_name} operator",))
    try:
        reasons = list(fw_op.not_supported_reasons(_xformers_inputs(status.fmha, q, k, v, bias)))
    except ValueError as error:  # validate_inputs: layout, shape or dtype mismatch
        reasons = [str(error)]
    if choice == "xformers:triton_splitk" and not _triton_available():
        reasons.append("Triton is not available")
    if reasons or status.problem:
        return Prepared(choice, None, _with_library_problem(reasons, status.problem))
    return Prepared(choice, _xformers_runner(status.fmha, fw_op, batch_limit), detail=fw_op.NAME)


def _triton_available() -> bool:
    try:
        import xformers

        return bool(xformers._is_triton_available())
    except Exception:
        return False


def _prepare_xformers_dispatch(choice: str, q, k, v, bias, batch_limit: int) -> Prepared:
    """xformers' own dispatcher, asked once per signature; the op it picks is then called directly."""
    status = xformers_status()
    if not status.importable:
        return _without_xformers(choice, q, status.problem)
    fmha = status.fmha
    try:
        inp = _xformers_inputs(fmha, q, k, v, bias)
        priority = list(fmha.dispatch._dispatch_fw_priority_list(inp, False))
    except ValueError as error:
        return Prepared(choice, None, _with_library_problem([str(error)], status.problem))
    rejected = []
    for fw_op in priority:
        reasons = fw_op.not_supported_reasons(inp)
        if not reasons and not status.problem:
            return Prepared(choice, _xformers_runner(fmha, fw_op, batch_limit), detail=fw_op.NAME)
        rejected.extend(f"{fw_op.NAME}: {reason}" for reason in reasons)
    return Prepared(choice, None, _with_library_problem(rejected, status.problem))


_SDPA_BACKENDS = {"sdpa:flash": "FLASH_ATTENTION", "sdpa:efficient": "EFFICIENT_ATTENTION",
                  "sdpa:cudnn": "CUDNN_ATTENTION", "sdpa:math": "MATH"}
_HALF = (torch.float16, torch.bfloat16)


def _sdpa_static_reasons(choice: str, q: torch.Tensor, bias: Any) -> list[str]:
    """Declared limits of PyTorch's SDPA kernels (what torch checks before it picks one)."""
    reasons = []
    kind = bias_kind(bias)
    if kind not in ("none", "tensor"):
        reasons.append(f"PyTorch SDPA cannot take a {kind} bias (only xformers can)")
    if choice in ("sdpa", "sdpa:math"):
        return reasons
    if q.device.type != "cuda":
        reasons.append(f"device={q.device.type} (needs cuda)")
    if choice in ("sdpa:flash", "sdpa:cudnn") and q.dtype not in _HALF:
        reasons.append(f"dtype={q.dtype} (needs float16 or bfloat16)")
    if choice == "sdpa:flash":
        if kind == "tensor":
            reasons.append("flash attention takes no tensor bias")
        if q.shape[-1] > 256:
            reasons.append(f"head dim {q.shape[-1]} > 256")
        if not torch.backends.cuda.is_flash_attention_available():
            reasons.append("this torch build has no flash attention")
    if choice == "sdpa:cudnn" and not torch.backends.cudnn.is_available():
        reasons.append("cuDNN is not available")
    return reasons


def _sdpa_torch_reasons(choice: str, q, k, v, bias) -> list[str]:
    """On CUDA, ask torch itself (it explains rejections as warnings). `SDPAParams` is not public API: if it
    changes, the error becomes this op's reason (`prepare`), and SDPA's default dispatch still runs."""
    check = {"sdpa:flash": "can_use_flash_attention", "sdpa:efficient": "can_use_efficient_attention",
             "sdpa:cudnn": "can_use_cudnn_attention"}.get(choice)
    if check is None or q.device.type != "cuda" or not hasattr(torch.backends.cuda, check):
        return []
    params = torch.backends.cuda.SDPAParams(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                            bias if isinstance(bias, torch.Tensor) else None, 0.0, False, False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ok = getattr(torch.backends.cuda, check)(params, True)
    return [] if ok else [str(w.message).strip() for w in caught] or [f"torch.backends.cuda.{check} is False"]


def _sdpa_runner(choice: str, batch_limit: int) -> Runner:
    backend = _SDPA_BACKENDS.get(choice)
    if backend is not None:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, backend)

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Any) -> torch.Tensor:
        q_, k_, v_ = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # BMHK -> BHMK views
        if backend is None:
            out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=bias)
        else:
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=bias)
        return out.transpose(1, 2)

    return _chunked(run, batch_limit)


def _prepare_sdpa(choice: str, q, k, v, bias, batch_limit: int) -> Prepared:
    reasons = _sdpa_static_reasons(choice, q, bias) or _sdpa_torch_reasons(choice, q, k, v, bias)
    if reasons:
        return Prepared(choice, None, tuple(reasons))
    return Prepared(choice, _sdpa_runner(choice, batch_limit))


def prepare(choice: str, q, k, v, bias=None, batch_limit: Optional[int] = None) -> Prepared:
    """Bind one concrete operator (not `auto`) to these inputs. Never raises for a known choice: an error while
    deciding (a private xformers or torch function renamed, a check that breaks) is a reason, so `auto` and
    `fall back` still reach SDPA."""
    if choice not in OPERATORS or choice == "auto":
        raise ValueError(f"unknown attention op {choice!r}; expected one of {', '.join(OP_CHOICES[1:])}")
    try:
        return _prepare(choice, q, k, v, bias, batch_limit)
    except Exception as error:  # noqa: BLE001 (deciding must never crash sampling)
        logger.debug("checking %s failed", choice, exc_info=True)
        return Prepared(choice, None, (f"checking {choice} failed: {type(error).__name__}: {error}",))


def _prepare(choice: str, q, k, v, bias, batch_limit: Optional[int]) -> Prepared:
    if choice == "xformers":
        return _prepare_xformers_dispatch(choice, q, k, v, bias, batch_limit or XFORMERS_BATCH_LIMIT)
    if choice in _XFORMERS_FW_OPS:
        return _prepare_xformers_op(choice, q, k, v, bias, batch_limit or XFORMERS_BATCH_LIMIT)
    return _prepare_sdpa(choice, q, k, v, bias, batch_limit or SDPA_BATCH_LIMIT)


# --------------------------------------------------------------------------------------------------------------
# The report behind GET /xformers_ipadapter/ops

TYPICAL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TYPICAL_HEAD_DIMS = (40, 64, 80, 160)  # SD1.5 40/80/160, SDXL 64


def _probe(choice: str, device: torch.device, dtype: torch.dtype, head_dim: int) -> tuple[str, ...]:
    q = torch.zeros(2, 64, 8, head_dim, device=device, dtype=dtype)
    k = torch.zeros(2, 77, 8, head_dim, device=device, dtype=dtype)
    return prepare(choice, q, k, k).reasons


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _summarise(failures: list[tuple[str, tuple[str, ...]]]) -> str:
    """Distinct reasons over all failed cases, each once, in the order first seen."""
    unique = dict.fromkeys(reason for _, reasons in failures for reason in reasons)
    return "; ".join(unique)


def operator_report(device: Optional[torch.device] = None) -> dict:
    """Every op choice with availability for the model's typical inputs on `device`.

    An op is available when, for every typical head dim, it runs at least one typical dtype; `reason` is empty
    then, and `notes` lists the cases it cannot run. `tensor_bias` and `fused` are the op's declared
    capabilities (`OPERATORS`): the widget shows mask_mode and fused from them.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    status = xformers_status()
    ops = []
    for choice in OP_CHOICES:
        concrete = "xformers" if choice == "auto" else choice
        cases = {(dt, hd): _probe(concrete, device, dt, hd) for dt in TYPICAL_DTYPES for hd in TYPICAL_HEAD_DIMS}
        failures = [(f"{_dtype_name(dt)} D={hd}", r) for (dt, hd), r in cases.items() if r]
        runs_every_head_dim = all(any(not cases[(dt, hd)] for dt in TYPICAL_DTYPES) for hd in TYPICAL_HEAD_DIMS)
        spec = OPERATORS[choice]
        capabilities = {"tensor_bias": spec.tensor_bias, "fused": spec.fused}
        if choice == "auto":  # auto always runs: xformers where it can, else SDPA
            note = _summarise(failures)
            ops.append({"name": choice, "available": True, "reason": "",
                        "notes": f"runs PyTorch SDPA where xformers cannot ({note})" if failures else "",
                        **capabilities})
            continue
        ops.append({"name": choice, "available": runs_every_head_dim,
                    "reason": "" if runs_every_head_dim else _summarise(failures),
                    "notes": _summarise(failures) if runs_every_head_dim and failures else "", **capabilities})
    return {"versions": {"torch": torch.__version__, "xformers": status.version},
            "device": str(device), "xformers_problem": status.problem, "ops": ops}
