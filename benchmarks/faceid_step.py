"""Per-step cost of a FaceID adapter against a plain IP-Adapter with the same number of image tokens, in a real
ComfyUI KSampler run (comfy.sample.sample, euler, CFG batch 2). The claim checked: FaceID adds no more per-step
cost than a plain adapter of the same token count (its face analysis and projection run once, at the node).

Models: the tiny UNet of the harness and a full-size SD1.5-shaped UNet (sampling_step.py's builders). Adapters
(random weights, to_k_ip/to_v_ip sized for every attn2 site) applied with the pack's real nodes on one model
that runs every attention on the same operator (Patch Model Attention, `--op`, default auto):
  base      Apply xformers IP-Adapter Attention, a base adapter (4 tokens)
  faceid    Apply xformers IP-Adapter FaceID, a FaceID adapter (4 tokens), faces from the tiny ONNX face models
  plus      Apply xformers IP-Adapter Attention, a plus adapter (16 tokens)
  portrait  Apply xformers IP-Adapter FaceID, a FaceID Portrait adapter (16 tokens)
and `plain` (no adapter) for the overhead itself. The FaceID LoRA is not part of the step: ComfyUI merges LoRA
weights into the model when it loads it. Ratios: median of per-round ratios with 95 % intervals
(common.estimate); the variants alternate round after round.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from typing import Optional

import torch

from common import Table, environment, estimate, setup_threads, write_results
from sampling_step import SD15_UNET, Setup, bootstrap, full_unet, sampler, time_runs

PAIRS = (("faceid", "base", 4), ("portrait", "plus", 16))


def site_layout(hh, tm, model, proj_layout: dict, cross: int) -> dict:
    """`proj_layout`'s image_proj keys plus to_k_ip/to_v_ip for every attn2 site of `model`."""
    layout = {k: v for k, v in proj_layout.items() if k.startswith("image_proj.")}
    for site in hh.pack_module("nodes.sites").attn2_sites(model):
        for name in ("to_k_ip", "to_v_ip"):
            layout[f"ip_adapter.{2 * site.index + 1}.{name}.weight"] = ("randn", (site.heads * site.dim_head, cross))
    return layout


def adapters(hh, tm, model, cross: int) -> dict:
    """Random base, plus, FaceID and Portrait adapters for `model` (tiny CLIP vision widths)."""
    from harness import tiny_faceid as tf

    ipadapter = hh.pack_module("processors.ipadapter")
    build = hh.pack_module("processors.ipadapter.faceid_adapter")
    clip = hh.TINY_CLIP_VISION
    layouts = {"base": tm.ipadapter_base_layout(clip["projection_dim"], cross=cross),
               "plus": tm.ipadapter_plus_layout(clip["hidden_size"], cross=cross),
               "faceid": tf.tiny_layout(tf.faceid_adapter_layout("faceid", cross=cross, inner_dims=(64,))),
               "portrait": tf.tiny_layout(tf.faceid_adapter_layout("portrait", cross=cross, inner_dims=(64,)))}
    out = {}
    for kind, layout in layouts.items():
        state = {k: t.float() for k, t in tm.fill(site_layout(hh, tm, model, layout, cross), seed=5).items()}
        if kind in ("faceid", "portrait"):
            out[kind] = build.faceid_from_state_dict(build.nested_or_none(state), f"random {kind}")
        else:
            out[kind] = ipadapter.ipadapter_from_state_dict(state, name=f"random {kind}")
    return out


def patched_models(hh, tm, model, cross: int, op: str, workdir: str) -> dict:
    from harness import tiny_onnx

    config = hh.pack_module("processors.backends").AttentionOpConfig(op=op)
    plain = hh.pack_module("nodes.patch_model").PatchXformersModelAttention.execute(model, config).result[0]
    apply_node = hh.pack_module("nodes.apply").ApplyXformersIPAdapterAttention
    faceid_node = hh.pack_module("nodes.faceid").ApplyXformersIPAdapterFaceID
    face = hh.pack_module("processors.face")
    analysis = face.load_face_analysis(tiny_onnx.write_model_pack(workdir, "buffalo_l"))
    face_image = tiny_onnx.draw_face(torch.zeros(256, 256, 3), (40, 30, 200, 190))[None]
    clip_vision = hh.tiny_clip_vision(workdir)
    common = dict(weight=1.0, weight_type="linear", start_at=0.0, end_at=1.0, embeds_scaling="V only",
                  combine_embeds="concat")
    found = adapters(hh, tm, model, cross)
    models = {"plain": plain}
    for kind in ("base", "plus"):
        models[kind] = apply_node.execute(plain, found[kind], clip_vision, hh.image(0), **common).result[0]
    for kind in ("faceid", "portrait"):
        models[kind] = faceid_node.execute(plain, found[kind], analysis, face_image, weight_faceidv2=1.0,
                                           **common).result[0]
    return models


def measure(hh, tm, name: str, model, setup: Setup, cross: int, device: str, op: str, workdir: str) -> dict:
    models = patched_models(hh, tm, model, cross, op, workdir)
    with torch.inference_mode():
        timings = time_runs({k: sampler(m, setup, cross, False) for k, m in models.items()}, setup.repeats, device)
    per_step = {k: estimate([t / setup.steps for t in v]).as_dict() for k, v in timings.samples.items()}
    pairs = {f"{a}/{b}": timings.ratio(a, b).as_dict() for a, b, _ in PAIRS}
    overheads = {k: timings.ratio(k, "plain").as_dict() for k in models if k != "plain"}
    print(f"{name} {setup.size}px: " + ", ".join(f"{k} {v['median']:.3f} [{v['ci95'][0]:.3f}, {v['ci95'][1]:.3f}]"
                                                  for k, v in pairs.items()), flush=True)
    return {"model": name, "op": op, "size": setup.size, "steps": setup.steps, "repeats": setup.repeats,
            "per_step_s": per_step, "pairs": pairs, "overheads": overheads, "samples_s": timings.samples}


def plan(quick: bool) -> list[tuple[str, Optional[dict], Setup]]:
    return [("tiny", None, Setup("tiny", 64, 4, 7 if quick else 21)),
            ("SD1.5", SD15_UNET, Setup("SD1.5", 256, 1 if quick else 2, 3 if quick else 9))]


def _ci(r: dict) -> str:
    return f"{r['median']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]"


def report(args: argparse.Namespace, results: list[dict]) -> None:
    t = Table(["model", "size", "steps x rounds", "tokens", "FaceID variant / plain adapter (95 % CI)",
               "plain adapter ms/step", "FaceID ms/step", "no adapter ms/step"])
    for r in results:
        for faceid, plain_kind, tokens in PAIRS:
            ms = {k: f"{v['median'] * 1e3:.1f}" for k, v in r["per_step_s"].items()}
            t.add(r["model"], f"{r['size']}x{r['size']}", f"{r['steps']} x {r['repeats']}", tokens,
                  f"{faceid} / {plain_kind}: {_ci(r['pairs'][f'{faceid}/{plain_kind}'])}", ms[plain_kind],
                  ms[faceid], ms["plain"])
    o = Table(["model", "adapter", "with adapter / without (95 % CI)"])
    for r in results:
        for kind, ratio in r["overheads"].items():
            o.add(r["model"], kind, _ci(ratio))
    reading = ("Per step: one warm sampling run / steps, CPU time of the process (one thread). A ratio interval "
               "that contains 1.000 means no difference is measurable at that noise. All runs on one operator "
               f"({results[0]['op'] if results else args.op}, through Patch Model Attention).")
    path = write_results(args.stem, "KSampler step: FaceID adapters against plain adapters of the same token count",
                         environment(args.device), [("How to read", reading),
                                                    ("FaceID vs a plain adapter with the same tokens", t.markdown()),
                                                    ("Each adapter vs no adapter", o.markdown())], results)
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--quick", action="store_true", help="fewer steps and rounds")
    parser.add_argument("--threads", type=int, help="CPU threads (default 1)")
    parser.add_argument("--models", nargs="*", help="subset of: tiny SD1.5")
    parser.add_argument("--op", default="auto", help="the attention op of every run (default auto)")
    parser.add_argument("--stem", default="faceid_step_cpu", help="results file stem")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    setup_threads(args.device, args.threads)
    hh, tm = bootstrap(args.device)
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for name, config, setup in plan(args.quick):
            if args.models and name not in args.models:
                continue
            model = full_unet(tm.TINY_UNET_CONFIG if config is None else config, torch.float32)
            results.append(measure(hh, tm, name, model, setup, 768, args.device, args.op, workdir))
            del model
    report(args, results)


if __name__ == "__main__":
    main()
