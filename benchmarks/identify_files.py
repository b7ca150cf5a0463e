"""How long the unified loader takes to identify the files of a model folder: cold (first sight: header read,
parsed, shapes checked) and warm (unchanged files, answered from the (path, size, mtime) cache).

50 files with the real key layouts and full-size shapes (SD1.5 / SDXL adapters of every kind, ViT-L / H / bigG
encoders in both layouts) are written as header + sparse data, so the folder takes a few MB of disk. Before each
cold round the page cache of every file is dropped (posix_fadvise DONTNEED), so "cold" includes the disk read.

    .venv/bin/python benchmarks/identify_files.py [--rounds 15]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import Table, environment, estimate, write_results  # noqa: E402
from harness import tiny_models as tm  # noqa: E402
from harness.model_files import clip_hf_shapes, clip_openclip_shapes, write_safetensors  # noqa: E402
from processors.ipadapter.identify import ADAPTER, CLIP_VISION, FileIdentifier  # noqa: E402

FILES = 50
SITES = {768: 16, 2048: 70}


def _shapes(layout: tm.Layout) -> dict:
    return {key: shape for key, (_, shape) in layout.items() if not key.startswith("ip_adapter.")}


def adapter_layout(kind: str, cross: int) -> dict:
    """Full-size image_proj of the released variant and one to_k_ip/to_v_ip pair per attn2 site."""
    if kind == "plus":
        dim, heads = (768, 12) if cross == 768 else (1280, 20)
        shapes = _shapes(tm.ipadapter_plus_layout(1280, cross=cross, dim=dim, depth=4, heads=heads))
    else:
        shapes = _shapes(tm.ipadapter_base_layout(1280 if kind == "vit-g" else 1024, cross=cross))
    for i in range(SITES[cross]):
        for name in ("to_k_ip", "to_v_ip"):
            shapes[f"ip_adapter.{2 * i + 1}.{name}.weight"] = (1280, cross)
    return shapes


def write_folder(root: Path) -> list[tuple[Path, str]]:
    kinds = [(ADAPTER, lambda k=k, c=c: adapter_layout(k, c)) for k in ("base", "vit-g", "plus") for c in (768, 2048)]
    kinds += [(CLIP_VISION, lambda s=s: clip_hf_shapes(s)) for s in ("ViT-L", "ViT-H", "ViT-bigG")]
    kinds += [(CLIP_VISION, lambda s=s: clip_openclip_shapes(s)) for s in ("ViT-H", "ViT-bigG")]
    files = []
    for i in range(FILES):
        role, layout = kinds[i % len(kinds)]
        path = root / role / f"model_{i:02d}.safetensors"
        write_safetensors(path, layout())
        files.append((path, role))
    return files


def drop_page_cache(files: list[tuple[Path, str]]) -> None:
    for path, _ in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def one_round(files: list[tuple[Path, str]]) -> tuple[float, float, int]:
    identifier = FileIdentifier()
    drop_page_cache(files)
    start = time.perf_counter()
    found = [identifier.identify(path, role) for path, role in files]
    cold = time.perf_counter() - start
    start = time.perf_counter()
    again = [identifier.identify(path, role) for path, role in files]
    warm = time.perf_counter() - start
    assert again == found and identifier.reads == len(files) and all(f.info is not None for f in found)
    return cold, warm, identifier.reads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--stem", default="identify_files_cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        files = write_folder(Path(tmp))
        declared = sum(p.stat().st_size for p, _ in files)
        on_disk = sum(p.stat().st_blocks * 512 for p, _ in files)
        rounds = [one_round(files) for _ in range(args.rounds)]
    cold, warm = estimate([r[0] for r in rounds]), estimate([r[1] for r in rounds])
    table = Table(["", f"all {FILES} files (ms)", "per file (ms)"])
    table.add("cold (page cache dropped, new cache)", f"{cold.value * 1e3:.1f} ±{cold.noise * 1e3:.1f}",
              f"{cold.value * 1e3 / FILES:.2f}")
    table.add("warm (unchanged files, cached)", f"{warm.value * 1e3:.2f} ±{warm.noise * 1e3:.2f}",
              f"{warm.value * 1e3 / FILES:.3f}")
    notes = (f"{FILES} files ({declared / 1e9:.1f} GB declared, {on_disk / 1e6:.1f} MB on disk): adapters of every "
             "kind for SD1.5 and SDXL, CLIP vision ViT-L/H/bigG in HF and OpenCLIP layouts. Medians of "
             f"{args.rounds} rounds with a 95 % interval. Cold reads 8 bytes + the JSON header of each file; "
             "warm is one stat() per file.")
    data = {"files": FILES, "cold_s": cold.as_dict(), "warm_s": warm.as_dict()}
    path = write_results(args.stem, "Identifying model files by shape", environment("cpu"),
                         [("Identification time", table.markdown() + "\n\n" + notes)], data)
    print(table.markdown())
    print(notes)
    print(f"written: {path}")


if __name__ == "__main__":
    main()
