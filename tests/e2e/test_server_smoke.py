"""Proves the e2e harness: a real server with the pack path and the tiny models runs a full SD1.5 graph."""
from PIL import Image


def smoke_prompt(models) -> dict:
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": models.name("unet"), "weight_dtype": "default"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": models.name("clip_l"), "type": "stable_diffusion"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": "a photo of a cat"}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 0], "text": ""}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "seed": 0, "steps": 2, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "7": {"class_type": "VAELoader", "inputs": {"vae_name": "taesd"}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["7", 0]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": "xipa_smoke"}},
    }


def test_object_info_lists_the_tiny_models(comfy_server, tiny_models):
    unet = comfy_server.object_info("UNETLoader")["UNETLoader"]
    assert tiny_models.name("unet") in unet["input"]["required"]["unet_name"][0]
    vae = comfy_server.object_info("VAELoader")["VAELoader"]
    assert "taesd" in vae["input"]["required"]["vae_name"][0]
    assert "KSampler" in comfy_server.object_info()


def test_minimal_sd15_prompt_writes_an_image(comfy_server, tiny_models):
    result = comfy_server.run(smoke_prompt(tiny_models), timeout=300)
    assert result["status"] == "success", result["message"] or comfy_server.log_tail()
    files = comfy_server.output_files(result["outputs"])
    assert len(files) == 1 and files[0].is_file()
    with Image.open(files[0]) as image:
        assert image.size == (64, 64)


def test_websocket_reports_progress(comfy_server, tiny_models):
    prompt = smoke_prompt(tiny_models)
    prompt["6"]["inputs"]["seed"] = 1  # not cached
    _, messages = comfy_server.run_ws(prompt, timeout=300)
    kinds = [m["type"] for m in messages]
    assert "execution_error" not in kinds, messages
    assert "progress" in kinds and kinds[-1] == "executing"
