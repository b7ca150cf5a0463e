#!/usr/bin/env python3
"""The main job: run the basic example workflow on a headless ComfyUI and report what happened.

    bash scripts/run_example.sh [options]       # sets up .venv and the ComfyUI host first, then runs this
    .venv/bin/python scripts/run_example.py [options]

It resolves a ComfyUI host the way the tests do (``COMFYUI_PATH``, the ComfyUI that contains this pack, or
ComfyUI 0.3.75 fetched into .cache/), starts it on 127.0.0.1 with this pack as a custom node, posts
example_workflows/api/sd15_image_prompt.json to ``/prompt`` and prints the output image, the attention
operator that ran (and why any fallback, from the server log) and the time per sampling step (from the
server's progress messages). The server it started is stopped on exit.

Models: real ones when a ComfyUI models tree holding the basic example's files is given (``--models-dir`` or
``XIPA_EXAMPLE_MODELS``, else ``$COMFYUI_PATH/models`` when it has them); otherwise tiny random-weight models
are generated into .cache/models (no downloads; the image is then noise, but every node runs for real).
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).absolute().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from harness import comfy_bootstrap, tiny_models  # noqa: E402
from harness import workflows as wf  # noqa: E402
from harness.server import ComfyServer  # noqa: E402

MODELS_ENV = "XIPA_EXAMPLE_MODELS"
DEFAULT_WORKDIR = REPO_ROOT / ".cache" / "run_example"
# What the pack logs about attention: the planner's decisions (processors.planner: the operator, the single pass
# in the same form, and fused mode).
OP_LINE = re.compile(r"(attention op '[^']*': ran .*|fused attention.*)$")
REPORT = re.compile(r"attention op '(?P<requested>[^']*)': ran (?P<ran>.+?)(?: because (?P<why>.*))?$")


class ExampleServer(ComfyServer):
    """The harness's server, on the GPU when asked (the harness always passes --cpu)."""

    def __init__(self, *args, gpu: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.gpu = gpu

    def command(self) -> list[str]:
        command = super().command()
        return [arg for arg in command if arg != "--cpu"] if self.gpu else command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models-dir", type=Path, default=os.environ.get(MODELS_ENV) or None,
                   help=f"ComfyUI models tree with checkpoints/, ipadapter/, clip_vision/ holding the basic "
                        f"example's files (env {MODELS_ENV}); default: tiny generated models")
    p.add_argument("--image", type=Path, help="reference image (default: a generated test pattern)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the workflow's 20)")
    p.add_argument("--size", type=int, help="image width and height in pixels (default: 512 real, 128 tiny)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="where ComfyUI runs (auto: the GPU if torch sees one)")
    p.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR,
                   help="server input/output/log folder (default: .cache/run_example)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the workflow")
    return p.parse_args(argv)


def real_models_dir(args: argparse.Namespace) -> Path | None:
    """The models tree to use, or None for tiny models. Exits when an explicit tree lacks files."""
    if args.models_dir is not None:
        missing = wf.missing_model_files(args.models_dir)
        if missing:
            sys.exit(f"run_example: {args.models_dir} lacks {', '.join(missing)} (see README, 'Model files')")
        return args.models_dir.resolve()
    comfyui = os.environ.get("COMFYUI_PATH")
    if comfyui and not wf.missing_model_files(Path(comfyui) / "models"):
        return (Path(comfyui) / "models").resolve()
    return None


def use_gpu(device: str) -> bool:
    if device == "cpu":
        return False
    import torch

    available = torch.cuda.is_available()
    if device == "gpu" and not available:
        sys.exit("run_example: --device gpu, but torch sees no CUDA device")
    return available


def build_prompt(models_dir: Path | None, args: argparse.Namespace) -> tuple[dict, object | None]:
    prompt = wf.load_api(wf.BASIC)
    models = None
    if models_dir is None:
        models = tiny_models.generate(clip_vision="vit-l")
        prompt = wf.tinyize(prompt, models, size=None, steps=None)
        size = args.size or 128
    else:
        size = args.size
    for node in prompt.values():
        if node["class_type"] == "EmptyLatentImage" and size:
            node["inputs"]["width"] = node["inputs"]["height"] = size
        if node["class_type"] == "KSampler" and args.steps:
            node["inputs"]["steps"] = args.steps
    return prompt, models


def run_with_progress(server: ComfyServer, prompt: dict, timeout: float) -> tuple[str, list[tuple[float, dict]]]:
    """Post the prompt while listening on /ws; returns the prompt id and (arrival time, message) pairs."""
    prompt_id, messages = server.run_ws(prompt, timeout)
    return prompt_id, [(m["received"], m) for m in messages]


def step_timing(events: list[tuple[float, dict]], sampler_id: str) -> tuple[float | None, float | None, int]:
    """(seconds per step, KSampler seconds, steps) from progress and executing messages."""
    progress = [(t, m["data"]["value"]) for t, m in events
                if m.get("type") == "progress" and str(m["data"].get("node")) == sampler_id]
    started = next((t for t, m in events if m.get("type") == "executing"
                    and str(m["data"].get("node")) == sampler_id), None)
    ended = None
    if started is not None:
        ended = next((t for t, m in events if t > started and m.get("type") in ("executing", "executed")
                      and str(m["data"].get("node")) != sampler_id), None)
    total = ended - started if started is not None and ended is not None else None
    steps = progress[-1][1] if progress else 0
    per_step = None
    if len(progress) >= 2 and progress[-1][1] > progress[0][1]:
        # from the end of the first step to the end of the last: excludes model loading before step 1
        per_step = (progress[-1][0] - progress[0][0]) / (progress[-1][1] - progress[0][1])
    elif total is not None and steps:
        per_step = total / steps
    return per_step, total, steps


def describe_op(line: str) -> str:
    """A server log line of processors.planner as the summary shows it."""
    m = REPORT.match(line)
    if m is None:
        return f"attention: {line}"
    text = f"attention op that ran: {m['ran']} (requested {m['requested']!r})"
    if m["why"]:
        text += f"\n  why not the requested one: {m['why']}"
    return text


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t_start = time.perf_counter()
    comfyui = comfy_bootstrap.resolve_comfyui()
    models_dir = real_models_dir(args)
    gpu = use_gpu(args.device)
    prompt, models = build_prompt(models_dir, args)
    sampler_id = next(i for i, n in prompt.items() if n["class_type"] == "KSampler")
    print(f"ComfyUI:  {comfyui}")
    if models is None:
        print(f"models:   {models_dir} (real files)")
    else:
        print(f"models:   tiny random-weight models in {models.root} (the image is noise; pass --models-dir "
              f"for real ones)")
    workdir = args.workdir.resolve()
    with ExampleServer(workdir, models_dir or models.root, comfyui=comfyui, gpu=gpu) as server:
        print(f"server:   {server.base_url} ({'GPU' if gpu else 'CPU'}), up in {server.startup_seconds:.1f} s, "
              f"log {server.log_path}")
        image = args.image or wf.write_reference_image(workdir / "reference.png")
        uploaded = server.upload_image(image)["name"]
        prompt = wf.replace_images(prompt, {name: uploaded for name in wf.image_inputs(prompt)})
        log_start = len(server.log_text())
        t_run = time.perf_counter()
        prompt_id, events = run_with_progress(server, prompt, args.timeout)
        run_seconds = time.perf_counter() - t_run
        result = server.wait_for(prompt_id, timeout=60)
        log = server.log_text()[log_start:]
        if result["status"] != "success":
            error = result["error"] or {}
            print(f"FAILED at node {error.get('node_id')} ({error.get('node_type')}): "
                  f"{error.get('exception_message', '').strip()}")
            print(f"server log: {server.log_path}")
            return 1
        files = server.output_files(result["outputs"])
        ops = list(dict.fromkeys(m.group(1).strip() for line in log.splitlines()
                                 if (m := OP_LINE.search(line.strip()))))
        per_step, sampler_seconds, steps = step_timing(events, sampler_id)

    print(f"workflow: example_workflows/{wf.BASIC}.json, run in {run_seconds:.1f} s")
    for path in files:
        print(f"output image: {path}")
    if ops:
        for line in ops:
            print(describe_op(line))
    else:
        print("attention: no operator report in the server log (see it for details)")
    if per_step is not None:
        sampler = f", KSampler {sampler_seconds:.2f} s" if sampler_seconds is not None else ""
        print(f"time per sampling step: {per_step:.3f} s ({steps} steps{sampler})")
    print(f"total: {time.perf_counter() - t_start:.1f} s (server stopped)")
    return 0 if files else 1


if __name__ == "__main__":
    sys.exit(main())
