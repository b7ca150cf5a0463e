"""The pack's caches on a real ComfyUI server, read through GET /xformers_ipadapter/memory: empty after every
run (freed at the end of sampling), gone with their adapters after POST /free, and not growing over runs with
different images, sizes, batch sizes and CFG layouts."""
from __future__ import annotations

import json
import logging
import time

import psutil  # a ComfyUI requirement
import pytest
from PIL import Image

from tests.e2e.test_workflow_e2e import ipadapter_prompt

log = logging.getLogger(__name__)

ROUTE = "/xformers_ipadapter/memory"
ADAPTER_CACHES = ("image K/V", "K/V rows", "masks")
RUNS = 12  # the 50-run series runs in-process (tests/host/test_memory.py): a server run costs ~10 s here
SIZES = [(64, 64), (48, 80), (96, 64), (32, 32), (80, 48)]


def memory(server) -> dict:
    response = server.get(ROUTE)
    assert response.status_code == 200, response.text
    return response.json()


def adapter_caches(stats: dict) -> dict:
    return {key: sum(stats["by_cache"].get(name, {}).get(key, 0) for name in ADAPTER_CACHES)
            for key in ("stores", "entries", "tensors", "bytes")}


@pytest.fixture(scope="module")
def images(comfy_server, tmp_path_factory) -> list[str]:
    folder = tmp_path_factory.mktemp("memory_images")
    names = []
    for i, size in enumerate([(96, 80), (224, 224), (61, 130)]):
        path = folder / f"xipa_memory_{i}.png"
        Image.effect_noise(size, 32 + 16 * i).convert("RGB").save(path)
        names.append(comfy_server.upload_image(path)["name"])
    return names


def varied_prompt(models, images: list[str], run: int) -> dict:
    """Run `run` of the series: another image, latent size, batch size, CFG layout, weight type and mask."""
    apply_inputs = {"weight_type": ("linear", "style transfer precise", "ease in")[run % 3]}
    prompt = ipadapter_prompt(models, images[run % len(images)], **apply_inputs)
    if run % 2:
        prompt["20"] = {"class_type": "SolidMask", "inputs": {"value": 0.75, "width": 40 + run, "height": 56}}
        prompt["9"]["inputs"]["attn_mask"] = ["20", 0]
    width, height = SIZES[run % len(SIZES)]
    prompt["10"]["inputs"].update(width=width, height=height, batch_size=1 + run % 3)
    prompt["11"]["inputs"].update(seed=run, steps=1, cfg=(5.0, 1.0)[run % 2])  # cfg 1: ComfyUI skips uncond
    return prompt


def test_memory_route_is_read_only_json(comfy_server):
    response = comfy_server.get("/api" + ROUTE)
    assert response.status_code == 200, response.text
    assert response.headers.get("Cache-Control") == "no-store"
    stats = response.json()
    assert set(stats) >= {"stores", "entries", "tensors", "bytes", "by_device", "by_cache"}
    assert comfy_server.http.post(comfy_server.base_url + ROUTE).status_code in (404, 405)


def test_runs_leave_nothing_cached_and_free_drops_every_store(comfy_server, tiny_models, images):
    process = psutil.Process(comfy_server.proc.pid)
    rss = {}
    for run in range(RUNS):
        _, messages = comfy_server.run_ws(varied_prompt(tiny_models, images, run), timeout=600)
        assert "execution_error" not in [m["type"] for m in messages], (
            json.dumps(messages)[-3000:] + comfy_server.log_tail())
        held = adapter_caches(memory(comfy_server))
        # the end of sampling freed every cached tensor; the last Apply output (cached by ComfyUI for the next
        # prompt) keeps its three empty stores, and an older one at most until it is collected
        assert (held["entries"], held["tensors"], held["bytes"]) == (0, 0, 0), (run, held)
        assert held["stores"] <= 6, (run, held)
        if run in (0, 9, RUNS - 1):
            rss[run + 1] = process.memory_info().rss
    response = comfy_server.http.post(comfy_server.base_url + "/free",
                                      json={"unload_models": True, "free_memory": True})
    assert response.status_code == 200, response.text
    deadline = time.monotonic() + 60  # the prompt worker handles the flags when it wakes up
    while adapter_caches(memory(comfy_server))["stores"] and time.monotonic() < deadline:
        time.sleep(0.5)
    after_free = memory(comfy_server)
    assert adapter_caches(after_free) == {"stores": 0, "entries": 0, "tensors": 0, "bytes": 0}, after_free
    assert after_free["tensors"] == 0 and after_free["bytes"] == 0, after_free  # nor the engine's derived ones
    rss["after /free"] = process.memory_info().rss
    log.warning("server RSS MiB after runs %s (reported, not asserted)",
                {k: round(v / 2**20) for k, v in rss.items()})
