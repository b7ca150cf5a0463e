"""GPU runner of both benchmarks, sized to finish in a few minutes on one H100/H200.

    python benchmarks/gpu_bench.py            # attention_layer (fp16 + bf16, every op) then sampling_step
    python benchmarks/gpu_bench.py --quick    # 4 image tokens only, tiny + SD1.5 sampling only

Writes benchmarks/results/attention_layer_gpu*.md|json|png and sampling_step_gpu*.md|json|png. The
correctness check of every operator (errors against fp32 references) is benchmarks/gpu_check.py; run it
first on a new machine. Each benchmark runs in its own process (ComfyUI is bootstrapped without --cpu there).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(script: str, *args: str) -> int:
    command = [sys.executable, str(HERE / script), "--device", "cuda", *args]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    code = subprocess.call(command)
    print(f"{script}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
    return code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", choices=("attention", "sampling"))
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench.py needs a CUDA device; on CPU run the two benchmarks directly")
    quick = ["--quick"] if args.quick else []
    codes = []
    if args.only in (None, "attention"):
        codes.append(run("attention_layer.py", *quick))
    if args.only in (None, "sampling"):
        codes.append(run("sampling_step.py", *quick, *(["--models", "tiny", "SD1.5"] if args.quick else [])))
    sys.exit(max(codes, default=0))


if __name__ == "__main__":
    main()
