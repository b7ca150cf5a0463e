"""The nodes' side of the planner: checks at the node before sampling, and the per-run report log."""

from __future__ import annotations

import comfy.model_management
import torch
from comfy.patcher_extension import CallbacksMP

from ..processors import planner
from ..processors.backends import AttentionOpConfig
from .sites import attn2_sites

RUN_LOG_KEY = "xformers_ipadapter_run_log"


def compute_dtype(model) -> torch.dtype:
    return model.get_model_object("manual_cast_dtype") or model.model.get_dtype()


def check_operator(config: AttentionOpConfig, model, masked: bool = False, adapters: int = 1) -> None:
    """With on_unsupported = error, fail at the node (not deep in the sampler) when the op cannot run, or
    fuse, this model's attention: the planner plans a typical request per head layout, as sampling will."""
    if config.on_unsupported != "error" or config.op == "auto":
        return
    heads = [(s.heads, s.dim_head) for s in attn2_sites(model)]
    planner.check_model(config, comfy.model_management.get_torch_device(), compute_dtype(model), heads,
                        masked=masked, adapters=adapters)


def start_run_log(model) -> None:
    """Each sampling run of `model` starts a new report log: every decision is logged once per run."""
    if RUN_LOG_KEY not in model.callbacks.get(CallbacksMP.ON_PRE_RUN, {}):
        model.add_callback_with_key(CallbacksMP.ON_PRE_RUN, RUN_LOG_KEY, lambda _: planner.begin_run())
