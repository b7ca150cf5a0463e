"""Per-step cost of Apply xformers IP-Adapter Batch (one image and weight per frame) in a real KSampler run,
and the memory its per-frame image K/V hold.

Model: the harness's tiny UNet (ComfyUI's UNetModel, random weights) with a random base IP-Adapter (4 image
tokens) at every attn2 site, the tiny CLIP vision, a latent batch of N frames (N = 16 and 32), euler, CFG (so
each call holds 2 N rows). All runs use the same attention operator (Patch Model Attention on `--op`), so
their differences are the adapter's:

  plain        the model alone
  shared image Apply xformers IP-Adapter Attention with one image for every frame
  per frame    Apply xformers IP-Adapter Batch, unfold_batch on, N images and N weights

The three runs alternate round after round (common.time_rounds); per step = one warm sampling run / steps, in
process CPU time on one thread (common.clock); ratios are medians of the per-round ratios with 95 %
intervals (common.estimate). Memory: the bytes the pack's caches hold (processors.tensor_cache.cache_stats),
read at every step of a per-frame run through the sampler's callback; the peak of the "image K/V" store is
compared with N x tokens x (sum of the sites' inner dims) x 4 tensors x 4 bytes.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from typing import Callable

import torch

from common import Table, environment, estimate, setup_threads, time_rounds, write_results
from sampling_step import bootstrap, conditioning, full_unet, random_adapter

CROSS = 768
SIZE = 64
TOKENS = 4  # the base adapter's image tokens


def sampler(model, frames: int, steps: int, on_step=None) -> Callable[[], torch.Tensor]:
    import comfy.sample

    latent = torch.zeros(frames, 4, SIZE // 8, SIZE // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(0))
    positive, negative = conditioning(1, CROSS, False), conditioning(2, CROSS, False)
    return lambda: comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, latent,
                                       seed=0, disable_pbar=True, callback=on_step)


def models(hh, tm, frames: int, op: str, workdir):
    base = full_unet(tm.TINY_UNET_CONFIG, torch.float32)
    config = hh.pack_module("processors.backends").AttentionOpConfig(op=op)
    plain = hh.pack_module("nodes.patch_model").PatchXformersModelAttention.execute(base, config).result[0]
    adapter, clip_vision = random_adapter(hh, tm, plain, CROSS), hh.tiny_clip_vision(workdir)
    common = dict(weight_type="linear", start_at=0.0, end_at=1.0, combine_embeds="concat", embeds_scaling="V only")
    shared = hh.pack_module("nodes.apply").ApplyXformersIPAdapterAttention.execute(
        plain, adapter, clip_vision, hh.image(0), weight=1.0, **common).result[0]
    images = torch.cat([hh.image(i) for i in range(frames)])
    weights = [i / (frames - 1) for i in range(frames)]
    per_frame = hh.pack_module("nodes.batch").ApplyXformersIPAdapterBatch.execute(
        plain, adapter, clip_vision, images, weight=weights, unfold_batch=True, encode_batch_size=8,
        **common).result[0]
    sites = hh.pack_module("nodes.sites").attn2_sites(plain)
    return plain, shared, per_frame, sites


def peak_cache_bytes(hh, run_with_callback) -> dict[str, int]:
    stats = hh.pack_module("processors.tensor_cache").cache_stats
    peak: dict[str, int] = {}

    def on_step(*_):
        for name, part in stats()["by_cache"].items():
            peak[name] = max(peak.get(name, 0), part["bytes"])

    run_with_callback(on_step)()
    return peak


def measure(hh, tm, frames: int, steps: int, repeats: int, op: str, workdir) -> dict:
    plain, shared, per_frame, sites = models(hh, tm, frames, op, workdir)
    with torch.inference_mode():
        fns = {"plain": sampler(plain, frames, steps), "shared image": sampler(shared, frames, steps),
               "per frame": sampler(per_frame, frames, steps)}
        for fn in fns.values():
            fn()  # warm-up: model load, operator resolution
        timings = time_rounds(fns, "cpu", repeats)
        peak = peak_cache_bytes(hh, lambda cb: sampler(per_frame, frames, steps, cb))
    per_step = {k: estimate([t / steps for t in v]) for k, v in timings.samples.items()}
    inner = sum(s.heads * s.dim_head for s in sites)
    expected_kv = frames * TOKENS * inner * 4 * 4 + frames * 4 * len(sites)  # + one fp32 scale per frame and site
    result = {"frames": frames, "steps": steps, "repeats": repeats, "sites": len(sites), "inner_sum": inner,
              "per_step_s": {k: v.as_dict() for k, v in per_step.items()},
              "per_frame_vs_plain": timings.ratio("per frame", "plain").as_dict(),
              "per_frame_vs_shared": timings.ratio("per frame", "shared image").as_dict(),
              "shared_vs_plain": timings.ratio("shared image", "plain").as_dict(),
              "peak_bytes": peak, "expected_image_kv_bytes": expected_kv}
    print(f"{frames} frames: plain {per_step['plain'].text('.4f')} s/step, shared {per_step['shared image'].text('.4f')}"
          f", per frame {per_step['per frame'].text('.4f')}; per frame / plain "
          f"{timings.ratio('per frame', 'plain').text('.3f')}, / shared {timings.ratio('per frame', 'shared image').text('.3f')};"
          f" image K/V peak {peak.get('image K/V', 0)} B (expected {expected_kv})", flush=True)
    return result


def _ratio(r: dict) -> str:
    low, high = r["ci95"]
    return f"{r['median']:.3f} [{low:.3f}, {high:.3f}]"


def _ms(r: dict) -> str:
    low, high = r["ci95"]
    return f"{r['median'] * 1e3:.1f} ±{max(r['median'] - low, high - r['median']) * 1e3:.1f}"


READING = (
    "Tiny UNet (the harness's, random weights), 64x64 latents, euler with CFG, fp32 on CPU, one thread. `plain`: "
    "the model on the op; `shared image`: Apply with one image for all frames; `per frame`: Apply Batch with "
    "unfold_batch, N images and N weights. ms/step: median over interleaved rounds ± half-width of its 95 % "
    "interval (process CPU time). Ratios: median of per-round ratios [95 % interval]. The tiny UNet makes the "
    "attention a large share of a step, so these ratios are an upper bound of what a full-size UNet sees. "
    "Memory: peak bytes of the pack's caches during a per-frame run (cache_stats, read at every step): `image "
    "K/V` must equal N x tokens x inner-dim sum x 4 tensors (K, V of cond and uncond) x 4 bytes, plus one fp32 "
    "scale per frame and site, whatever the number of steps; `K/V rows` are the gathered rows of the call "
    "layouts (bounded per site).")


def report(args, results: list[dict]) -> None:
    t = Table(["frames", "steps x rounds", "plain ms/step", "shared image ms/step", "per frame ms/step",
               "per frame / plain", "per frame / shared image"])
    m = Table(["frames", "attn2 sites", "inner dims (sum)", "image K/V peak (bytes)", "expected (bytes)",
               "K/V rows peak (bytes)"])
    for r in results:
        s = r["per_step_s"]
        t.add(r["frames"], f"{r['steps']} x {r['repeats']}", _ms(s["plain"]), _ms(s["shared image"]),
              _ms(s["per frame"]), _ratio(r["per_frame_vs_plain"]), _ratio(r["per_frame_vs_shared"]))
        m.add(r["frames"], r["sites"], r["inner_sum"], r["peak_bytes"].get("image K/V", 0),
              r["expected_image_kv_bytes"], r["peak_bytes"].get("K/V rows", 0))
    path = write_results(args.stem, "Apply Batch: per-frame images and weights, per-step cost and K/V memory",
                         environment("cpu"), [("How to read", READING), ("Per-step time", t.markdown()),
                                              ("Memory of the per-frame image K/V", m.markdown())], results)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", nargs="*", type=int, default=[16, 32])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds (9: a 95 % interval)")
    parser.add_argument("--op", default="auto")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--stem", default="batch_frames_cpu")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    setup_threads("cpu", args.threads)
    hh, tm = bootstrap("cpu")
    with tempfile.TemporaryDirectory() as workdir:
        results = [measure(hh, tm, n, args.steps, args.repeats, args.op, workdir) for n in args.frames]
    report(args, results)


if __name__ == "__main__":
    main()
