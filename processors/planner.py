"""The planner: the one place that decides what runs for an attention request.

A request is a set of attentions that share one query, in xformers' BMHK layout: the host's text attention
first (unless the host computes that one itself: a replace callable of another pack, or the joint attention
of a Flux or SD3 block), then one per adapter. Given the operator config (`AttentionOpConfig`) and the
request's signature, the planner returns a `Plan`:

- the formulation: `separate` (one kernel call per attention), `fused` (the text and every adapter in one
  block-diagonal xformers call) or `single pass` (PyTorch matmuls, for short image key sets on CPU);
- the runner of each call, on the operator that resolved: the requested one, or PyTorch SDPA where it
  cannot run and `on_unsupported` is "fall back";
- its report lines, logged once per sampling run (`begin_run` starts one).

Plans are cached per signature (bounded), so the hot path is one dict lookup plus the kernels. The operator
registry (`backends`) says per operator whether and why not; only the planner combines those answers, and
the nodes ask it (`check_config`, `check_model`) before sampling when on_unsupported is "error".
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from . import backends
from . import single_pass as sp
from .backends import AttentionOpConfig, Runner, UnsupportedOperatorError, bias_kind
from .bias import aligned_bias
from .fused import PackedRunner, fused_unavailable_reason, pack

logger = logging.getLogger(__name__)

SEPARATE, FUSED, SINGLE_PASS = "separate", "fused", "single pass"
DEFAULT_CONFIG = AttentionOpConfig()
# Distinct signatures one planner keeps: a sampling run sees a few per block resolution and batch layout;
# past this the oldest plan is dropped (it holds no tensors, so this bounds bookkeeping only).
PLAN_CAPACITY = 256


# --------------------------------------------------------------------------------------------------------------
# Resolution of one attention: requested op -> what runs


@dataclass(frozen=True)
class Resolution:
    requested: str
    ran: str
    runner: Runner = field(repr=False, compare=False)
    rejected: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (op, reasons) for every op that could not run
    detail: str = ""  # e.g. which xformers kernel its dispatcher picked

    @property
    def fell_back(self) -> bool:
        return self.requested != self.ran and self.requested != "auto"

    @property
    def runs_xformers(self) -> bool:
        return self.ran.startswith("xformers")

    def report(self, ran: Optional[str] = None) -> str:
        """One line: which operator ran and why any fallback. `ran` names another path that runs instead of
        the resolved operator (the single pass)."""
        ran = ran or (f"{self.ran} ({self.detail})" if self.detail else self.ran)
        if not self.rejected:
            return f"attention op {self.requested!r}: ran {ran}"
        why = "; ".join(f"{name}: {', '.join(reasons)}" for name, reasons in self.rejected)
        return f"attention op {self.requested!r}: ran {ran} because {why}"


def resolve(requested: str, q, k, v, bias=None, on_unsupported: str = "fall back",
            batch_limit: Optional[int] = None) -> Resolution:
    """The operator that runs this one attention (uncached: `Planner` caches whole plans)."""
    first = "xformers" if requested == "auto" else requested
    prepared = backends.prepare(first, q, k, v, bias, batch_limit)
    if prepared.runner is not None:
        return Resolution(requested, first, prepared.runner, detail=prepared.detail)
    if requested != "auto" and on_unsupported == "error":
        raise UnsupportedOperatorError(
            f"attention op {requested!r} cannot run these inputs (q {tuple(q.shape)} {q.dtype} on {q.device}, "
            f"bias {bias_kind(bias)}): {'; '.join(prepared.reasons)}. Choose another op, or set "
            f"on_unsupported to 'fall back'.")
    fallback = backends.prepare("sdpa", q, k, v, bias, batch_limit)
    if fallback.runner is None:
        raise UnsupportedOperatorError(
            f"no attention operator can run these inputs: {first}: {'; '.join(prepared.reasons)}; "
            f"{fallback.name}: {'; '.join(fallback.reasons)}")
    return Resolution(requested, fallback.name, fallback.runner, ((first, prepared.reasons),), fallback.detail)


# --------------------------------------------------------------------------------------------------------------
# The run log: each report line once per sampling run


_run_log: dict[str, bool] = {}  # line -> logged as a warning


def begin_run() -> None:
    """Start a new sampling run: each distinct report line is logged once per run."""
    _run_log.clear()


def run_reports() -> list[str]:
    """The report lines seen since `begin_run`, in order (logs, the main job's summary, tests)."""
    return list(_run_log)


def _log_once(lines: Sequence[tuple[str, bool]]) -> None:
    for line, warn in lines:
        if line not in _run_log:
            _run_log[line] = warn
            (logger.warning if warn else logger.info)("%s", line)


# --------------------------------------------------------------------------------------------------------------
# Plans


@dataclass(frozen=True)
class Plan:
    formulation: str
    # separate: one runner per attention; fused: the packed call's runner; single pass: none
    runners: tuple[Runner, ...] = field(repr=False)
    lines: tuple[tuple[str, bool], ...]  # (report line, is a warning)

    @property
    def report(self) -> str:
        return " | ".join(line for line, _ in self.lines)


def _signature(q4: torch.Tensor, keys: Sequence[torch.Tensor], biases: Sequence[Any], has_text: bool) -> tuple:
    """Everything a plan depends on, cheap to build per call. Values always come with their keys (same
    length and layout), so keys stand for both."""
    return (q4.shape, q4.stride(), q4.dtype, q4.device, has_text,
            tuple((k.shape[1], k.stride()) for k in keys),
            tuple(None if b is None else (b.dtype, b.stride()) if isinstance(b, torch.Tensor) else type(b)
                  for b in biases))


class Planner:
    """Plans for one operator config, cached per request signature.

    `batch_limit` overrides the operators' grid limit (tests). `fused_runner` replaces the xformers kernel of
    the packed call (tests prove the packing on CPU with a materialized bias).
    """

    def __init__(self, config: Optional[AttentionOpConfig] = None, batch_limit: Optional[int] = None,
                 fused_runner: Optional[PackedRunner] = None) -> None:
        self.config = config or DEFAULT_CONFIG
        self.batch_limit = batch_limit
        self.fused_runner = fused_runner
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()

    def plan(self, q4: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
             biases: Sequence[Any], *, has_text: bool = True) -> Plan:
        """The plan for attentions that share `q4` (text first when `has_text`), logged once per run."""
        key = _signature(q4, keys, biases, has_text)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._make_plan(q4, keys, values, biases, has_text)
            if len(self._plans) > PLAN_CAPACITY:
                self._plans.popitem(last=False)
        _log_once(plan.lines)
        return plan

    def attention(self, q4: torch.Tensor, k4: torch.Tensor, v4: torch.Tensor, bias: Any = None) -> torch.Tensor:
        """One plain attention (Patch Model Attention's override): `[B, Mq, H, D]` -> `[B, Mq, H, Dv]`."""
        return self.plan(q4, (k4,), (v4,), (bias,), has_text=False).runners[0](q4, k4, v4, bias)

    # ---------------------------------------------------------------------------------------------------------

    def _make_plan(self, q4, keys, values, biases, has_text: bool) -> Plan:
        single = self._single_pass(q4, keys, values, biases) if has_text else None
        if single is not None:
            return single
        notes: tuple[tuple[str, bool], ...] = ()
        if self.config.fused and len(keys) > 1:
            runner, line = self._fused(q4, keys, values, biases)
            if runner is not None:
                return Plan(FUSED, (runner,), ((line, False),))
            notes = ((line, True),)
        cfg = self.config
        resolutions = [resolve(cfg.op, q4, k, v, b, cfg.on_unsupported, self.batch_limit)
                       for k, v, b in zip(keys, values, biases)]
        lines = dict.fromkeys((r.report(), r.fell_back) for r in resolutions)
        return Plan(SEPARATE, tuple(r.runner for r in resolutions), notes + tuple(lines))

    def _single_pass(self, q4, keys, values, biases) -> Optional[Plan]:
        """The single pass where the measured rule (`single_pass.fits`) says it wins and `auto` would
        otherwise fall back to SDPA (xformers cannot run); reported like an operator, with the reason."""
        image_lengths = [k.shape[1] for k in keys[1:]]
        if not (self.config.op == "auto" and all(b is None for b in biases) and sp.fits(q4, image_lengths)):
            return None
        resolution = resolve("auto", q4, keys[0], values[0], None, self.config.on_unsupported, self.batch_limit)
        if resolution.runs_xformers:
            return None
        line = resolution.report(sp.describe(q4, keys[0].shape[1], image_lengths))
        return Plan(SINGLE_PASS, (), ((line, False),))

    def _fused(self, q4, keys, values, biases) -> tuple[Optional[Runner], str]:
        """The packed call's runner and its report line, or None and why not. With on_unsupported = error and
        an explicit op, "why not" is an error: the user asked for fused mode on that op."""
        cfg = self.config
        why = fused_obstacle(cfg, any(b is not None for b in biases))
        if not why:
            try:
                bias, qp, kp, vp = pack(q4, keys, values)
                if self.fused_runner is not None:
                    return self.fused_runner, f"fused attention ({len(keys)} attentions): test runner"
                resolution = resolve(cfg.op, qp, kp, vp, bias, cfg.on_unsupported, self.batch_limit)
                if resolution.runs_xformers:
                    return resolution.runner, f"fused attention ({len(keys)} attentions): {resolution.report()}"
                why = resolution.report()
            except Exception as error:  # noqa: BLE001 (deciding must never crash sampling)
                why = str(error) if isinstance(error, UnsupportedOperatorError) else \
                    f"packing failed: {type(error).__name__}: {error}"
        if cfg.on_unsupported == "error" and cfg.op != "auto":
            raise UnsupportedOperatorError(
                f"fused mode cannot run with attention op {cfg.op!r}: {why}. Turn fused off, choose an op that "
                f"fuses ({', '.join(backends.FUSED_OPS)}), or set on_unsupported to 'fall back'.")
        return None, f"fused attention not possible, running separate calls: {why}"


def fused_obstacle(config: AttentionOpConfig, has_tensor_bias: bool) -> str:
    """Why fused mode cannot run at all for this config, before any inputs are seen ('' if it may)."""
    missing = fused_unavailable_reason()
    if missing:
        return missing
    if not backends.OPERATORS[config.op].fused:
        return f"{config.op!r} takes no block-diagonal mask"
    if has_tensor_bias:
        return "fused mode cannot combine with a tensor bias (text mask or 'attention bias' mask mode)"
    return ""


# --------------------------------------------------------------------------------------------------------------
# Checks at the node (on_unsupported = "error"): fail before sampling, with the run time's own decision


def check_config(config: AttentionOpConfig, device: torch.device) -> None:
    """Select Attention Op: the op must run on this device for the typical inputs, and fuse if asked to."""
    if config.on_unsupported != "error" or config.op == "auto":
        return
    entry = next(o for o in backends.operator_report(device)["ops"] if o["name"] == config.op)
    if not entry["available"]:
        raise UnsupportedOperatorError(
            f"attention op {config.op!r} cannot run on this machine ({device}): {entry['reason']}. "
            f"Pick an available op, or set on_unsupported to 'fall back'.")
    if config.fused and not backends.OPERATORS[config.op].fused:
        raise UnsupportedOperatorError(
            f"fused mode needs an op that takes xformers' block-diagonal mask; {config.op!r} does not. Choose one "
            f"of {', '.join(backends.FUSED_OPS)}, turn fused off, or set on_unsupported to 'fall back'.")


def check_model(config: AttentionOpConfig, device: torch.device, dtype: torch.dtype,
                head_shapes: Sequence[tuple[int, int]], masked: bool = False, adapters: int = 1) -> None:
    """Apply / Patch Model Attention: plan a typical request for each (heads, head dim) of the model, as the
    sampler will, so an op that cannot run (or fuse) these inputs fails here with on_unsupported = error."""
    if config.on_unsupported != "error" or config.op == "auto":
        return
    planner = Planner(config)
    for heads, dim_head in sorted(set(head_shapes)):
        q = torch.zeros(2, 64, heads, dim_head, device=device, dtype=dtype)
        text = torch.zeros(2, 77, heads, dim_head, device=device, dtype=dtype)
        image = torch.zeros(2, 4, heads, dim_head, device=device, dtype=dtype)
        keys, biases = [text] + [image] * adapters, [None] * (1 + adapters)
        if masked and config.mask_mode == "attention bias":
            image = torch.zeros(2, 5, heads, dim_head, device=device, dtype=dtype)  # + the null token
            bias = aligned_bias(torch.zeros(1, 1, 64, 5), (2, heads, 64, 5), dtype, device)
            keys, biases = [text] + [image] * adapters, [None] + [bias] * adapters
        planner._make_plan(q, keys, keys, biases, has_text=True)
