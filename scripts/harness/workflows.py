"""The example workflows (example_workflows/) as tests and the main-job command use them.

Each example exists twice: ``example_workflows/<name>.json`` in the UI format (what ComfyUI lists under
Workflow -> Browse Templates, edited and saved in the UI) and ``example_workflows/api/<name>.json`` in the
API format (what ``POST /prompt`` takes; "Export (API)" in the UI). Both name the real model files a user
downloads. ``ui_to_api`` turns a UI workflow into its API form with the node definitions of a running
server (``/object_info``), so a test can check that the two never drift; ``tinyize`` swaps the real model
files for the tiny generated ones (tiny_models.py) so the API twins run on CPU without downloads.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Mapping

from . import REPO_ROOT

EXAMPLES_DIR = REPO_ROOT / "example_workflows"
API_DIR = EXAMPLES_DIR / "api"

WORKFLOWS = ("sd15_image_prompt", "sdxl_style_transfer", "two_adapters_regional_masks", "patch_model_attention",
             "unified_loader_chain", "embeds_round_trip", "style_composition", "animation_batch",
             "regional_conditioning", "tiled_reference", "flux_xlabs", "sd35_instantx", "faceid")
BASIC = "sd15_image_prompt"
# Examples the e2e test checks (UI <-> API twin, templates, real file names) but does not sample, and why.
NOT_SAMPLED = {
    "flux_xlabs": "ComfyUI's Flux detection fixes the width at 3072 (24 heads, axes_dim [16, 56, 56]), so no tiny "
                  "Flux loads from a file; the Flux path is sampled by tests/host/test_flux_ipadapter.py on a tiny "
                  "Flux built from ComfyUI's own classes (scripts/harness/tiny_dit.py)",
    "sd35_instantx": "ComfyUI's MMDiT detection would load a tiny SD3 diffusion model (64 x depth wide; "
                     "tiny_dit.tiny_sd3 builds one), but the example's other models have no tiny stand-ins: "
                     "TripleCLIPLoader's clip_g/clip_l/t5xxl (SD3's 4096-wide padded context) and the 16-channel "
                     "SD3 VAE; the SD3.5 path is sampled by tests/host/test_sd3_ipadapter.py on that tiny SD3",
}
# Loaders an example may take its diffusion model from (Flux's flux1-dev.safetensors is a diffusion-model file).
MODEL_LOADERS = ("CheckpointLoaderSimple", "UNETLoader")

# Frontend-only nodes: never sent to /prompt.
VIRTUAL_NODES = frozenset({"Note", "MarkdownNote"})
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})

# Real file names in the examples -> key of tiny_models.TinyModels.files. SDXL files map to SD1.5-sized tiny
# ones: ComfyUI cannot detect a tiny SDXL UNet, so the SDXL example runs on the tiny SD1.5 UNet.
CHECKPOINTS = ("v1-5-pruned-emaonly.safetensors", "sd_xl_base_1.0.safetensors")
IPADAPTERS = {
    "ip-adapter_sd15.safetensors": "ipadapter_base",
    "ip-adapter-plus_sd15.safetensors": "ipadapter_plus",
    "ip-adapter-plus_sdxl_vit-h.safetensors": "ipadapter_plus",
}
CLIP_VISION = ("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",)
# Model files the basic example needs, by ComfyUI model folder (the main-job command checks for them).
BASIC_MODEL_FILES = {
    "checkpoints": "v1-5-pruned-emaonly.safetensors",
    "ipadapter": "ip-adapter_sd15.safetensors",
    "clip_vision": "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors",
}


def sampled() -> tuple[str, ...]:
    """The examples the e2e test runs with tiny models."""
    return tuple(name for name in WORKFLOWS if name not in NOT_SAMPLED)


def ui_path(name: str) -> Path:
    return EXAMPLES_DIR / f"{name}.json"


def api_path(name: str) -> Path:
    return API_DIR / f"{name}.json"


def load_ui(name: str) -> dict:
    return json.loads(ui_path(name).read_text())


def load_api(name: str) -> dict:
    return json.loads(api_path(name).read_text())


# --- UI format -> API format ------------------------------------------------------------------------------

def _is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _widget_slots(node_def: dict) -> list[tuple[str, int]]:
    """(input name, number of widgets_values entries it takes) in the frontend's widget order."""
    slots = []
    order = node_def.get("input_order") or {s: list(node_def["input"].get(s, {})) for s in ("required", "optional")}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = node_def["input"][section][name]
            if not _is_widget(spec):
                continue
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            # seed-like inputs carry a "control after generate" value; image_upload combos an upload button value
            extra = int(bool(options.get("control_after_generate"))) + int(bool(options.get("image_upload")))
            slots.append((name, 1 + extra))
    return slots


def ui_to_api(ui: dict, object_info: Mapping[str, dict]) -> dict:
    """The API-format prompt a UI-format workflow queues (what the frontend's graphToPrompt sends)."""
    links = {link[0]: link for link in ui["links"]}
    prompt: dict[str, dict] = {}
    for node in ui["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) != 0:
            continue
        node_def = object_info.get(node["type"])
        if node_def is None:
            raise KeyError(f"node {node['id']}: unknown node type {node['type']!r}")
        inputs: dict[str, Any] = {}
        values = list(node.get("widgets_values") or [])
        position = 0
        for name, width in _widget_slots(node_def):
            if position >= len(values):
                raise ValueError(f"node {node['id']} ({node['type']}): no widget value for {name!r}")
            inputs[name] = values[position]
            position += width
        if position != len(values):
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values, "
                             f"its widgets take {position}")
        for slot in node.get("inputs", []):
            link_id = slot.get("link")
            if link_id is None:
                continue
            _, origin, origin_slot, target, _, _ = links[link_id]
            if target != node["id"]:
                raise ValueError(f"link {link_id} ends at node {target}, not {node['id']}")
            inputs[slot["name"]] = [str(origin), origin_slot]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def check_ui_links(ui: dict) -> list[str]:
    """Consistency problems between the nodes' input/output slots and the links array (empty: none)."""
    problems = []
    nodes = {n["id"]: n for n in ui["nodes"]}
    for link_id, origin, origin_slot, target, target_slot, kind in ui["links"]:
        out = nodes[origin]["outputs"][origin_slot]
        inp = nodes[target]["inputs"][target_slot]
        if link_id not in (out.get("links") or []):
            problems.append(f"link {link_id} missing from node {origin} output {origin_slot}")
        if inp.get("link") != link_id:
            problems.append(f"link {link_id} is not node {target} input {target_slot}'s link")
        if not (out["type"] == inp["type"] == kind):
            problems.append(f"link {link_id}: types {out['type']} -> {inp['type']} ({kind})")
    used = {link[0] for link in ui["links"]}
    for node in ui["nodes"]:
        for slot in node.get("inputs", []):
            if slot.get("link") is not None and slot["link"] not in used:
                problems.append(f"node {node['id']} input {slot['name']} names unknown link {slot['link']}")
    if ui.get("last_link_id", 0) < max(used, default=0):
        problems.append("last_link_id is below a link id")
    if ui.get("last_node_id", 0) < max(nodes, default=0):
        problems.append("last_node_id is below a node id")
    return problems


# --- real model files -> tiny generated ones --------------------------------------------------------------

def image_inputs(prompt: Mapping[str, dict]) -> list[str]:
    """Image file names the prompt's LoadImage nodes read from the input folder (to upload first)."""
    return sorted({n["inputs"]["image"] for n in prompt.values() if n["class_type"] == "LoadImage"})


def replace_images(prompt: Mapping[str, dict], names: Mapping[str, str]) -> dict:
    """A copy with LoadImage file names replaced (e.g. by the names /upload/image answered)."""
    out = copy.deepcopy(dict(prompt))
    for node in out.values():
        if node["class_type"] == "LoadImage" and node["inputs"]["image"] in names:
            node["inputs"]["image"] = names[node["inputs"]["image"]]
    return out


def _rewire(prompt: dict, old: tuple[str, int], new: list) -> None:
    for node in prompt.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and len(value) == 2 and (str(value[0]), value[1]) == old:
                node["inputs"][name] = list(new)


def tinyize(prompt: Mapping[str, dict], models, size: int | None = 64, steps: int | None = 2) -> dict:
    """The API prompt with the tiny generated models (a tiny_models.TinyModels) in place of the real files.

    CheckpointLoaderSimple becomes UNETLoader (same node id, MODEL stays output 0) plus a CLIPLoader and a
    VAELoader "taesd" (ids ``<id>_clip`` / ``<id>_vae``) that take over its CLIP and VAE outputs. IP-Adapter
    and CLIP vision names map to the tiny files; ``size`` (pixels, EmptyLatentImage) and ``steps`` (KSampler,
    an upper bound) shrink the run when not None. Unknown real names raise, so a new example cannot silently
    run something else.
    """
    out = copy.deepcopy(dict(prompt))
    for node_id in list(out):
        node = out[node_id]
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            if inputs["ckpt_name"] not in CHECKPOINTS:
                raise KeyError(f"no tiny stand-in for checkpoint {inputs['ckpt_name']!r}")
            out[node_id] = {"class_type": "UNETLoader",
                            "inputs": {"unet_name": models.name("unet"), "weight_dtype": "default"}}
            out[f"{node_id}_clip"] = {"class_type": "CLIPLoader",
                                      "inputs": {"clip_name": models.name("clip_l"), "type": "stable_diffusion"}}
            out[f"{node_id}_vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}}
            _rewire(out, (node_id, 1), [f"{node_id}_clip", 0])
            _rewire(out, (node_id, 2), [f"{node_id}_vae", 0])
        elif kind == "LoadXformersIPAdapter":
            inputs["ipadapter_file"] = models.name(IPADAPTERS[inputs["ipadapter_file"]])
        elif kind == "CLIPVisionLoader":
            if inputs["clip_name"] not in CLIP_VISION:
                raise KeyError(f"no tiny stand-in for CLIP vision {inputs['clip_name']!r}")
            inputs["clip_name"] = models.name("clip_vision")
        elif kind == "EmptyLatentImage" and size is not None:
            inputs["width"] = inputs["height"] = size
        elif kind == "KSampler" and steps is not None:
            inputs["steps"] = min(inputs["steps"], steps)
    return out


def missing_model_files(models_dir: Path | str, files: Mapping[str, str] = BASIC_MODEL_FILES) -> list[str]:
    """``folder/file`` entries of `files` that `models_dir` (a ComfyUI models tree) lacks."""
    root = Path(models_dir)
    return [f"{folder}/{name}" for folder, name in files.items() if not (root / folder / name).is_file()]


def write_reference_image(path: Path | str, seed: int = 0, size: int = 256) -> Path:
    """A deterministic colourful PNG to use as the reference image (no downloads)."""
    import torch
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    phase = torch.rand(3, generator=gen) * 6.283
    freq = 2.0 + torch.rand(3, generator=gen) * 4.0
    channels = [0.5 + 0.5 * torch.sin(freq[c] * (x + y * (c + 1)) * 3.1416 + phase[c]) for c in range(3)]
    pixels = (torch.stack(channels, -1) * 255).round().to(torch.uint8).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path
