"""The adapters' caches follow the model on a real ComfyUI (in-process, CPU): filled during a sampling run,
freed at its end (ON_CLEANUP), freed when ComfyUI unloads the model (ON_DETACH), dropped when the model moves
to another device (model_patches_to), produced in the compute dtype, bounded, and not growing over 50 runs."""
from __future__ import annotations

import gc
import logging

import pytest
import torch

from harness import host_helpers as hh

log = logging.getLogger(__name__)

from tests.host.test_apply_node import DEFAULTS

ADAPTER_CACHES = ("image K/V", "K/V rows", "masks")


@pytest.fixture(scope="module")
def adapter(pack):
    return hh.adapter("base")


@pytest.fixture(scope="module")
def stats(pack):
    return hh.pack_module("processors.tensor_cache").cache_stats


def apply(model, adapter, clip_vision, image=None, **overrides):
    node = hh.pack_module("nodes.apply").ApplyXformersIPAdapterAttention
    image = hh.image(0) if image is None else image
    with torch.inference_mode():  # as ComfyUI's executor runs every node (else CLIP vision builds autograd graphs)
        return node.execute(model, adapter, clip_vision, image, **{**DEFAULTS, **overrides}).result[0]


def held(stats) -> dict:
    """Entries, tensors and bytes the adapters' caches hold, after collecting garbage (dead applications)."""
    gc.collect()
    by_cache = stats()["by_cache"]
    return {key: sum(by_cache.get(name, {}).get(key, 0) for name in ADAPTER_CACHES)
            for key in ("stores", "entries", "tensors", "bytes")}


def sample_recording(model, stats, *, height: int = 64, width: int = 64, batch: int = 1, cfg: float = 4.0,
                     steps: int = 2, seed: int = 0) -> list[dict]:
    """A real KSampler run; returns what the pack's caches held after each step (read from inside the run)."""
    import comfy.sample

    during: list[dict] = []

    def record(args):
        during.append(stats())
        return args["denoised"]

    model = model.clone()
    model.set_model_sampler_post_cfg_function(record)
    latent = torch.zeros(batch, 4, height // 8, width // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        comfy.sample.sample(model, noise, steps, cfg, "euler", "normal", hh.conditioning(1), hh.conditioning(2),
                            latent, seed=seed, disable_pbar=True)
    return during


def resident_bytes() -> int:
    import psutil  # a ComfyUI requirement

    return psutil.Process().memory_info().rss


def attn2(model) -> dict:
    return model.model_options["transformer_options"]["patches_replace"]["attn2"]


def fill_outside_a_run(model, batch: int = 2, grid: tuple[int, int] = (8, 8)):
    """Call every patch once as ComfyUI would (cond and uncond rows), without a sampling run around it."""
    gen = torch.Generator().manual_seed(1)
    for key, patch in attn2(model).items():
        q = torch.randn(batch, grid[0] * grid[1], 320, generator=gen)
        k = torch.randn(batch, 77, 320, generator=gen)
        extra = {"n_heads": 8, "cond_or_uncond": [1, 0], "block": key[:2], "block_index": key[2],
                 "activations_shape": [batch, 320, *grid], "original_shape": [batch, 4, *grid]}
        patch(q, k, k, extra)


def test_caches_fill_during_a_run_and_are_freed_at_its_end(unet, clip_vision, adapter, stats):
    patched = apply(unet, adapter, clip_vision, attn_mask=torch.rand(1, 40, 56), weight_type="style transfer precise")
    assert held(stats)["tensors"] == 0
    during = sample_recording(patched, stats)
    assert during and all(s["by_cache"]["image K/V"]["tensors"] > 0 for s in during)
    assert during[-1]["by_cache"]["masks"]["entries"] > 0
    after = held(stats)
    assert after["stores"] >= 3 and (after["entries"], after["tensors"], after["bytes"]) == (0, 0, 0)
    # freed, not broken: the next run rebuilds them and samples the same latent
    assert torch.equal(hh.sample(patched, steps=2), hh.sample(patched, steps=2))


def test_comfyui_unloading_the_model_frees_the_caches(unet, clip_vision, adapter, stats):
    import comfy.model_management as mm

    patched = apply(unet, adapter, clip_vision, attn_mask=torch.rand(1, 16, 16))
    mm.load_models_gpu([patched])
    fill_outside_a_run(patched)
    filled = held(stats)
    assert filled["tensors"] > 0 and filled["bytes"] > 0
    mm.unload_all_models()  # what POST /free {"unload_models": true} runs: detach -> ON_DETACH
    assert held(stats)["tensors"] == 0


def test_moving_the_model_drops_caches_on_other_devices_and_a_dtype_keeps_them(unet, clip_vision, adapter, stats):
    patched = apply(unet, adapter, clip_vision)
    fill_outside_a_run(patched)
    before = held(stats)
    patches = dict(attn2(patched))
    patched.model_patches_to(torch.float16)  # what LoadedModel.model_load does after the device
    patched.model_patches_to(torch.device("cpu"))  # the device the caches are on
    assert attn2(patched) == patches  # ComfyUI stored what .to() returned: the same shared objects
    assert held(stats) == before
    patched.model_patches_to(torch.device("meta"))  # any other device
    assert held(stats)["tensors"] == 0


def test_branch_caches_kv_scale_and_mask_in_the_compute_dtype(unet, clip_vision, adapter):
    patched = apply(unet, adapter, clip_vision)
    patch = attn2(patched)[("input", 1, 0)]
    site, built = patch.site, patch.applications[0]
    # precise weight types send the image to the negative rows (a per-row scale tensor); the mask is out of
    # 0..1 on purpose: clamping is check_mask's job, once at the node, never the cache's
    application = hh.pack_module("nodes.patch").AdapterApplication(
        kv=built.kv, swaps=(True,) * len(built.swaps), mask=torch.full((1, 8, 8), 7.0))
    q = torch.randn(2, 64, 320).half()
    extra = {"cond_or_uncond": [1, 0], "activations_shape": [2, 320, 8, 8], "original_shape": [2, 4, 8, 8]}
    first = application.branch(site, q, extra, torch.float32)
    assert first.k.dtype == first.v.dtype == first.scale.dtype == first.mask.dtype == torch.float32
    assert torch.equal(first.mask, torch.full((1, 64), 7.0))  # one mask: broadcast over the rows
    again = application.branch(site, q, extra, torch.float32)
    assert again.k is first.k and again.scale is first.scale and again.mask is first.mask  # nothing cast per call
    default = application.branch(site, q, extra)
    assert default.k.dtype == default.scale.dtype == default.mask.dtype == torch.float16


def test_layout_caches_are_bounded(unet, clip_vision, adapter):
    patch_module = hh.pack_module("nodes.patch")
    patched = apply(unet, adapter, clip_vision, attn_mask=torch.rand(1, 16, 16))
    application = attn2(patched)[("input", 1, 0)].applications[0]
    site = attn2(patched)[("input", 1, 0)].site
    for batch in range(1, 12):
        for chunks in ([0], [1], [1, 0], [0, 1], [1, 0, 0]):
            q = torch.randn(batch * len(chunks), 64, 320)
            extra = {"cond_or_uncond": chunks, "activations_shape": [q.shape[0], 320, 8, 8],
                     "original_shape": [q.shape[0], 4, 8, 8]}
            assert application.branch(site, q, extra) is not None
    assert len(application._rows) == patch_module.ROW_LAYOUTS_PER_SITE * len(application.swaps)
    assert len(application._masks) == patch_module.MASK_ENTRIES


def live_tensor_count() -> int:
    gc.collect()
    return sum(issubclass(type(o), torch.Tensor) for o in gc.get_objects())  # type(): no proxy __class__ lookups


def test_fifty_runs_with_different_images_sizes_and_layouts_do_not_grow(unet, clip_vision, adapter, stats):
    sizes = [(64, 64), (48, 80), (96, 64), (32, 32), (80, 48)]
    baseline = held(stats)
    # what other tests' live objects still hold (derived tensors live as long as their sources): each run must
    # end with exactly this, without a garbage collection
    before = {key: stats()[key] for key in ("entries", "tensors", "bytes")}
    live_tensors, peaks, rss = {}, [], {0: resident_bytes()}
    for run in range(1, 51):
        height, width = sizes[run % len(sizes)]
        mask = torch.rand(1 + run % 3, 24 + run, 40, generator=torch.Generator().manual_seed(run)) if run % 2 else None
        patched = apply(unet, adapter, clip_vision, image=hh.image(run, batch=1 + run % 2),
                        weight_type=("linear", "style transfer precise", "ease in")[run % 3], attn_mask=mask)
        during = sample_recording(patched, stats, height=height, width=width, batch=1 + run % 3,
                                  cfg=(4.0, 1.0)[run % 2], steps=1, seed=run)
        peaks.append(max(s["bytes"] for s in during))
        after = stats()  # no garbage collection needed: the run's end released the caches explicitly
        assert {key: after[key] for key in before} == before, (run, after)
        del patched, during
        if run % 10 == 0:
            live_tensors[run], rss[run] = live_tensor_count(), resident_bytes()
    assert min(peaks) > 0  # the runs did cache K/V
    assert held(stats) == baseline  # every application of the 50 runs is gone with its stores
    # the process's live tensors: flat once warm (the first runs fill ComfyUI's own per-shape caches)
    assert max(live_tensors[r] for r in (20, 30, 40, 50)) <= live_tensors[10], live_tensors
    log.warning("50 runs: peak cached bytes during a run %d..%d; live tensors %s; RSS MiB %s (reported, not "
                "asserted: allocator noise)", min(peaks), max(peaks), live_tensors,
                {run: round(b / 2**20) for run, b in rss.items()})
