"""The start/end window of an adapter, decided once per sampling step without a host sync per call.

Shared by every patch kind (attn2 sites, DiT blocks): a patch asks many times per step whether its adapter is
active; the answer depends only on the step's sigma, so it is computed once per step (one host read of the
sigmas tensor the host passes in its options) and kept for that tensor object.
"""

from __future__ import annotations

from typing import Optional

# (sigma_start, sigma_end) meaning the whole schedule: no sigma is read at all.
ALWAYS = (float("inf"), float("-inf"))


def active_in_window(window: tuple[float, float], memo: list, options: dict) -> bool:
    """Whether `end <= sigma <= start` at this step. `memo` is the caller's `[sigmas tensor, decision]` pair,
    updated when the host passes a new sigmas tensor (a new step); reset it to `[None, True]` to decide again."""
    if window == ALWAYS:
        return True
    sigmas: Optional[object] = options.get("sigmas")
    if sigmas is None:
        return True
    if memo[0] is not sigmas:
        sigma = float(sigmas.reshape(-1)[0])
        start, end = window
        memo[:] = [sigmas, end <= sigma <= start]
    return memo[1]
