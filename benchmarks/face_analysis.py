"""Face analysis per image on CPU (processors/face): the whole analyze() and its stages, for every onnxruntime
provider available here, with the tiny synthetic model pack (harness/tiny_onnx.py).

The tiny networks are a few kB and a handful of operations, where the real det_10g (SCRFD-10G, about 10 GFLOPs at
640x640) and w600k_r50 (ResNet-50 ArcFace, about 5 GFLOPs per face) are far heavier: the figures are a LOWER
BOUND of a real run and measure mainly what this pack adds around the networks (letterbox, decoding, NMS,
alignment, warp, normalisation). Samples are CPU time of the process (all onnxruntime threads included).

    .venv/bin/python benchmarks/face_analysis.py [--budget 6] [--stem face_analysis_cpu]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Table, environment, setup_threads, time_interleaved, write_results  # noqa: E402
from harness import tiny_onnx  # noqa: E402
from processors.face import analysis as fa, scrfd  # noqa: E402
from processors.face.align import estimate_norm, warp_affine  # noqa: E402

CASES = {  # name -> (height, width, face boxes)
    "512x512, 1 face": (512, 512, [(100, 80, 300, 280)]),
    "1024x768 (resized), 1 face": (768, 1024, [(200, 150, 600, 550)]),
    "640x640, 3 faces": (640, 640, [(20, 20, 120, 120), (200, 200, 400, 400), (450, 450, 600, 600)]),
    "640x640, no face": (640, 640, []),
}


def image_for(height: int, width: int, boxes) -> torch.Tensor:
    image = torch.rand(height, width, 3, generator=torch.Generator().manual_seed(0)) * 0.3  # dark noise
    for box in boxes:
        image = tiny_onnx.draw_face(image, box)
    return image


def stages(analysis: fa.FaceAnalysis, image: torch.Tensor) -> dict:
    """The whole analyze() and each stage alone, as callables."""
    pixels = (image * 255).clamp(0, 255).floor()
    box = scrfd.letterbox(pixels, 640)
    sig = analysis._det_sig
    outputs = analysis._detector.run(list(sig.output_names), {sig.input_name: box.tensor})
    found = scrfd.postprocess(outputs, 640, box.scale)
    crops = torch.stack([warp_affine(pixels, estimate_norm(k, 112), 112) for k in found.kps]) if len(found.kps) \
        else None
    fns = {
        "analyze (whole)": lambda: analysis.analyze(image),
        "letterbox": lambda: scrfd.letterbox(pixels, 640),
        "detector network (tiny)": lambda: analysis._detector.run(list(sig.output_names), {sig.input_name: box.tensor}),
        "decode + NMS": lambda: scrfd.postprocess(outputs, 640, box.scale),
    }
    if crops is not None:
        fns["align + warp (all faces)"] = lambda: [warp_affine(pixels, estimate_norm(k, 112), 112) for k in found.kps]
        fns["recognizer network (tiny, all faces)"] = lambda: analysis.embed_crops(crops)
    return fns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=6.0, help="seconds per case")
    parser.add_argument("--stem", default="face_analysis_cpu")
    args = parser.parse_args()
    setup_threads("cpu", 1)
    report = fa.providers_report()
    providers = [row["name"] for row in report["providers"] if row["available"]]
    unavailable = [f"{row['name']} ({row['reason'].split(' (')[0]})" for row in report["providers"]
                   if not row["available"]]
    sections, data = [], {"onnxruntime": report["onnxruntime"], "providers": providers, "cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        pack = tiny_onnx.write_model_pack(tmp, "buffalo_l")
        for provider in providers:
            start = time.perf_counter()
            analysis = fa.FaceAnalysis(pack, provider)
            load_ms = (time.perf_counter() - start) * 1e3
            table = Table(["case", "stage", "ms per image (median ±95 % CI)"])
            for case, (height, width, boxes) in CASES.items():
                image = image_for(height, width, boxes)
                assert len(analysis.analyze(image)) == len(boxes), case
                timings = time_interleaved(stages(analysis, image), "cpu", args.budget)
                data["cases"][f"{provider}/{case}"] = {k: v for k, v in timings.samples.items()}
                for stage in timings.samples:
                    est = _estimate(timings.samples[stage])
                    table.add(case, stage, f"{est.value * 1e3:.2f} ±{est.noise * 1e3:.2f}")
            sections.append((f"Provider {provider} (session creation for both tiny models: {load_ms:.0f} ms)",
                             table.markdown()))
            print(sections[-1][0]), print(table.markdown())
    notes = ("Tiny synthetic models with the real signatures (a few kB): a lower bound. The real det_10g and "
             "w600k_r50 cost far more per image, so on real models the network time dominates and the pack's own "
             "stages (letterbox, decode + NMS, align + warp) are the overhead to compare with it. CPU time of the "
             "process, 1 torch thread, onnxruntime's default threads; medians of interleaved rounds. "
             f"onnxruntime {report['onnxruntime']}; providers not available here: {', '.join(unavailable)}.")
    sections.append(("Notes", notes))
    path = write_results(args.stem, "Face analysis per image (tiny models, CPU)", environment("cpu"), sections, data)
    print(notes)
    print(f"written: {path}")


def _estimate(values):
    from benchmarks.common import estimate

    return estimate(values)


if __name__ == "__main__":
    main()
