"""GET /xformers_ipadapter/ops: which attention operators can run here, and why the others cannot.

Read-only and cheap: computed once per process; `?refresh=1` computes it again (e.g. after a driver change).
"""

from __future__ import annotations

import logging

from aiohttp import web

from ..processors import backends
from ..processors.tensor_cache import cache_stats

logger = logging.getLogger(__name__)

ROUTE = "/xformers_ipadapter/ops"
MEMORY_ROUTE = "/xformers_ipadapter/memory"
_cached: dict | None = None


def ops_report(refresh: bool = False) -> dict:
    global _cached
    if _cached is None or refresh:
        import comfy.model_management

        _cached = backends.operator_report(comfy.model_management.get_torch_device())
    return _cached


async def get_ops(request: web.Request) -> web.Response:
    refresh = request.query.get("refresh", "") not in ("", "0", "false")
    # The report can change with ?refresh=1 (and between server runs): browsers must not reuse a stale copy.
    return web.json_response(ops_report(refresh), headers={"Cache-Control": "no-store"})


async def get_memory(request: web.Request) -> web.Response:
    """Read-only: what the pack's caches hold now (processors.tensor_cache.cache_stats), for users and tests."""
    return web.json_response(cache_stats(), headers={"Cache-Control": "no-store"})


def register(server) -> None:
    """Add the routes to ComfyUI's PromptServer (its routes are mounted at / and /api)."""
    server.routes.get(ROUTE)(get_ops)
    server.routes.get(MEMORY_ROUTE)(get_memory)
