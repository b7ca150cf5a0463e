"""The pack in a real ComfyUI server: the full IP-Adapter graph over /prompt, the contract in /object_info,
and bad input reported as the node's execution error."""

import json
import math

import pytest
from PIL import Image

WEIGHT_TYPES = ["linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output",
                "weak middle", "strong middle", "style transfer", "composition", "strong style transfer",
                "style and composition", "style transfer precise", "composition precise"]
OPS = ["auto", "xformers", "xformers:cutlass", "xformers:flash", "xformers:flash3", "xformers:ck",
       "xformers:triton_splitk", "sdpa", "sdpa:flash", "sdpa:efficient", "sdpa:cudnn", "sdpa:math"]


@pytest.fixture(scope="module")
def reference_image(comfy_server, tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "xipa_reference.png"
    Image.effect_noise((96, 80), 64).convert("RGB").save(path)
    return comfy_server.upload_image(path)["name"]


def ipadapter_prompt(models, image: str, **apply_inputs) -> dict:
    apply = {"model": ["1", 0], "ipadapter": ["7", 0], "clip_vision": ["5", 0], "image": ["6", 0],
             "weight": 1.0, "weight_type": "linear", "start_at": 0.0, "end_at": 1.0,
             "combine_embeds": "concat", "embeds_scaling": "V only", "attention_op": ["8", 0]}
    apply.update(apply_inputs)
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": models.name("unet"), "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": models.name("clip_l"), "type": "stable_diffusion"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a photo of a cat"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "blurry"}},
        "5": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": models.name("clip_vision")}},
        "6": {"class_type": "LoadImage", "inputs": {"image": image}},
        "7": {"class_type": "LoadXformersIPAdapter", "inputs": {"ipadapter_file": models.name("ipadapter_base")}},
        "8": {"class_type": "SelectXformersAttentionOp", "inputs": {
            "op": "auto", "mask_mode": "multiply output", "fused": False, "on_unsupported": "fall back"}},
        "9": {"class_type": "ApplyXformersIPAdapterAttention", "inputs": apply},
        "10": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "11": {"class_type": "KSampler", "inputs": {
            "model": ["9", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["10", 0],
            "seed": 3, "steps": 3, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "12": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["11", 0], "vae": ["12", 0]}},
        "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "xipa_e2e"}},
    }


def test_full_ipadapter_graph_runs_and_saves_an_image(comfy_server, tiny_models, reference_image):
    _, messages = comfy_server.run_ws(ipadapter_prompt(tiny_models, reference_image), timeout=600)
    kinds = [m["type"] for m in messages]
    assert "execution_error" not in kinds, json.dumps(messages)[-3000:] + comfy_server.log_tail()
    assert [m["data"]["value"] for m in messages if m["type"] == "progress"][-1] == 3
    saved = next(m["data"]["output"]["images"] for m in messages
                 if m["type"] == "executed" and m["data"]["node"] == "14")
    files = comfy_server.output_files({"14": {"images": saved}})
    assert len(files) == 1
    with Image.open(files[0]) as image:
        assert image.size == (64, 64)
    log = comfy_server.log_text()
    assert "attention op 'auto': ran sdpa because" in log and "device=cpu" in log  # the visible fallback


def test_object_info_matches_the_contract(comfy_server):
    info = comfy_server.object_info()
    load = info["LoadXformersIPAdapter"]
    assert load["display_name"] == "Load IP-Adapter Model (xformers)"
    assert list(load["input"]["required"]) == ["ipadapter_file"] and load["output"] == ["XFORMERS_IPADAPTER"]

    select = info["SelectXformersAttentionOp"]
    assert select["display_name"] == "Select Attention Op" and select["output"] == ["ATTENTION_OP"]
    required = select["input"]["required"]
    assert list(required) == ["op", "mask_mode", "fused", "on_unsupported"]
    assert required["op"][1]["options"] == OPS
    assert required["mask_mode"][1]["options"] == ["multiply output", "attention bias"]
    assert required["fused"][0] == "BOOLEAN" and required["fused"][1]["default"] is False
    assert required["on_unsupported"][1]["options"] == ["fall back", "error"]

    apply = info["ApplyXformersIPAdapterAttention"]
    assert apply["display_name"] == "Apply xformers IP-Adapter Attention" and apply["output"] == ["MODEL"]
    required, optional = apply["input"]["required"], apply["input"]["optional"]
    assert list(required) == ["model", "ipadapter", "clip_vision", "image", "weight", "weight_type", "start_at",
                              "end_at", "combine_embeds", "embeds_scaling"]
    assert [required[k][0] for k in ("model", "ipadapter", "clip_vision", "image")] == [
        "MODEL", "XFORMERS_IPADAPTER", "CLIP_VISION", "IMAGE"]
    weight = required["weight"][1]
    assert (required["weight"][0], weight["default"], weight["min"], weight["max"]) == ("FLOAT", 1.0, -1.0, 5.0)
    assert required["start_at"][1]["default"] == 0.0 and required["end_at"][1]["default"] == 1.0
    assert required["weight_type"][1]["options"] == WEIGHT_TYPES
    assert required["combine_embeds"][1]["options"] == ["concat", "add", "subtract", "average", "norm average"]
    assert required["embeds_scaling"][1]["options"] == ["V only", "K+V", "K+V w/ C penalty",
                                                        "K+mean(V) w/ C penalty"]
    assert {k: v[0] for k, v in optional.items()} == {"attention_op": "ATTENTION_OP", "attn_mask": "MASK",
                                                      "image_negative": "IMAGE", "layer_weights": "STRING",
                                                      "enhance_tiles": "INT"}
    assert optional["enhance_tiles"][1]["default"] == 1  # 1 = off: a saved workflow without it runs as before

    patch = info["PatchXformersModelAttention"]
    assert patch["display_name"] == "Patch Model Attention (xformers)" and patch["output"] == ["MODEL"]
    assert {k: v[0] for k, v in patch["input"]["required"].items()} == {"model": "MODEL",
                                                                        "attention_op": "ATTENTION_OP"}
    for node in (load, select, apply, patch):  # every input has a tooltip, every node a description
        assert node["description"]
        for section in node["input"].values():
            assert all(spec[1].get("tooltip") for spec in section.values()), node["name"]


def execution_error(comfy_server, prompt: dict) -> dict:
    """Post as raw JSON (NaN allowed, as Python's json module and ComfyUI's parser accept it)."""
    body = json.dumps({"prompt": prompt, "client_id": comfy_server.client_id})
    response = comfy_server.http.post(comfy_server.base_url + "/prompt", data=body, timeout=30,
                                      headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    result = comfy_server.wait_for(response.json()["prompt_id"], timeout=600)
    assert result["status"] == "error", result
    return result["error"]


@pytest.mark.parametrize("case, inputs, message", [
    ("nan weight", {"weight": math.nan}, "weight must be a finite number"),
    ("bad window", {"start_at": 0.9, "end_at": 0.1}, "start_at and end_at must satisfy"),
])
def test_bad_apply_inputs_are_the_apply_nodes_execution_error(comfy_server, tiny_models, reference_image,
                                                              case, inputs, message):
    error = execution_error(comfy_server, ipadapter_prompt(tiny_models, reference_image, **inputs))
    assert error["node_type"] == "ApplyXformersIPAdapterAttention" and error["node_id"] == "9"
    assert message in error["exception_message"]


def test_wrong_clip_vision_for_the_adapter(comfy_server, tiny_models, reference_image):
    prompt = ipadapter_prompt(tiny_models, reference_image)
    prompt["7"]["inputs"]["ipadapter_file"] = tiny_models.name("ipadapter_plus")  # hidden states...
    prompt["9"]["inputs"]["weight"] = 0.9
    assert comfy_server.run(prompt, timeout=600)["status"] == "success"  # ...fits this ViT-L
    mismatched = ipadapter_prompt(tiny_models, reference_image, image_negative=["6", 0])
    mismatched["5"] = {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": tiny_models.name("clip_vision")}}
    mismatched["7"]["inputs"]["ipadapter_file"] = wrong_width_adapter(comfy_server, tiny_models)
    error = execution_error(comfy_server, mismatched)
    assert error["node_id"] == "9"
    assert "this IP-Adapter expects 1280-d CLIP vision embeddings (ViT-bigG)" in error["exception_message"]
    assert "load CLIP-ViT-bigG-14" in error["exception_message"]


def wrong_width_adapter(comfy_server, tiny_models) -> str:
    """A base adapter sized for ViT-bigG embeddings (1280), written next to the tiny models."""
    from safetensors.torch import save_file
    from harness import tiny_models as tm

    path = tiny_models.root / "ipadapter" / "tiny_sd15_base_bigg.safetensors"
    if not path.is_file():
        save_file(tm.fill(tm.ipadapter_base_layout(1280), seed=11), str(path))
    return path.name


def test_unavailable_operator_with_error_fails_at_the_select_node(comfy_server, tiny_models, reference_image):
    prompt = ipadapter_prompt(tiny_models, reference_image)
    prompt["8"]["inputs"].update(op="xformers:cutlass", on_unsupported="error")
    error = execution_error(comfy_server, prompt)
    assert error["node_type"] == "SelectXformersAttentionOp"
    assert "'xformers:cutlass' cannot run on this machine (cpu)" in error["exception_message"]
    assert "device=cpu" in error["exception_message"]


def test_sdxl_adapter_on_an_sd15_model(comfy_server, tiny_models, reference_image):
    from safetensors.torch import save_file
    from harness import tiny_models as tm

    path = tiny_models.root / "ipadapter" / "tiny_sdxl_shaped.safetensors"
    if not path.is_file():  # SDXL's 70 sites and 2048-d context (narrow K/V keep the file small)
        layout = {k: v for k, v in tm.ipadapter_base_layout(tiny_models.clip_embed_dim, cross=2048).items()
                  if not k.startswith("ip_adapter.")}
        layout.update(tm._ip_layers(sites=70, inner=16, cross=2048))
        save_file(tm.fill(layout, seed=12), str(path))
    prompt = ipadapter_prompt(tiny_models, reference_image)
    prompt["7"]["inputs"]["ipadapter_file"] = path.name
    error = execution_error(comfy_server, prompt)
    assert error["node_id"] == "9"
    assert ("this IP-Adapter is for SDXL (cross-attention 2048, 70 sites); the model is SD1.5 (768, 4 sites)"
            in error["exception_message"])
