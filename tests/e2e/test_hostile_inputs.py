"""Bad input tried through POST /prompt as a hostile user would (issue 10), on a real ComfyUI server.

Validation cases must be a 400 naming the input (nothing runs); runtime cases a node execution error with a
message that says what to do. The server here also loads tests/e2e/hostile_nodes.py (test-only nodes for
values stock nodes never produce: an fp16 IMAGE, a mask of 7, any value on a linked combo) and has its own
`ipadapter` folder, so the broken adapter files written here are seen by no other test.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from harness.server import ComfyServer
from tests.e2e.test_workflow_e2e import ipadapter_prompt

HERE = Path(__file__).resolve().parent
SELECT, LOAD, APPLY = "8", "7", "9"


def _isolated_models(tiny_models, root: Path) -> Path:
    """The tiny models' folders as symlinks, except `ipadapter`: a folder of its own (links to the tiny files)."""
    root.mkdir()
    for folder in tiny_models.root.iterdir():
        if folder.is_dir() and folder.name != "ipadapter":
            (root / folder.name).symlink_to(folder, target_is_directory=True)
    (root / "ipadapter").mkdir()
    for file in (tiny_models.root / "ipadapter").iterdir():
        (root / "ipadapter" / file.name).symlink_to(file)
    return root


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("hostile_server")
    (workdir / "custom_nodes").mkdir()
    shutil.copy(HERE / "hostile_nodes.py", workdir / "custom_nodes" / "xipa_hostile_test_nodes.py")
    models = _isolated_models(tiny_models, workdir / "models")
    with ComfyServer(workdir, models) as running:
        yield running


@pytest.fixture(scope="module")
def image(server, tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "xipa_hostile_reference.png"
    Image.effect_noise((72, 64), 64).convert("RGB").save(path)
    return server.upload_image(path)["name"]


@pytest.fixture(scope="module")
def adapters(server) -> Path:
    return server.models_dir / "ipadapter"


def prompt_for(tiny_models, image: str, **apply_inputs) -> dict:
    prompt = ipadapter_prompt(tiny_models, image, **apply_inputs)
    prompt["11"]["inputs"]["steps"] = 2
    return prompt


def saving_latents(prompt: dict) -> dict:
    """The prompt with the KSampler's latent saved (exact numbers) instead of a decoded PNG."""
    for node in ("12", "13", "14"):
        prompt.pop(node)
    prompt["15"] = {"class_type": "SaveLatent", "inputs": {"samples": ["11", 0], "filename_prefix": "xipa_hostile"}}
    return prompt


def run_error(server: ComfyServer, prompt: dict) -> dict:
    status, body = server.post_prompt(prompt)
    assert status == 200, body
    result = server.wait_for(body["prompt_id"], timeout=600)
    assert result["status"] == "error", result["status"]
    return result["error"]


def run_ok(server: ComfyServer, prompt: dict) -> dict:
    result = server.run(prompt, timeout=600)
    assert result["status"] == "success", result["message"] + server.log_tail()
    return result


def rejection(server: ComfyServer, prompt: dict, node: str) -> list[dict]:
    status, body = server.post_prompt(prompt)
    assert status == 400, body
    assert body["error"]["type"] == "prompt_outputs_failed_validation"
    return body["node_errors"][node]["errors"]


# --- validation: a correct workflow passes, a wrong combo value is a 400 naming the input -------------------------

def test_a_correct_workflow_passes_validation_and_runs(server, tiny_models, image):
    status, body = server.post_prompt(prompt_for(tiny_models, image))
    assert status == 200 and body["node_errors"] == {}, body
    assert server.wait_for(body["prompt_id"], timeout=600)["status"] == "success"


def test_patch_model_workflow_passes_validation(server, tiny_models, image):
    prompt = prompt_for(tiny_models, image)
    prompt["16"] = {"class_type": "PatchXformersModelAttention", "inputs": {"model": ["1", 0],
                                                                           "attention_op": [SELECT, 0]}}
    prompt[APPLY]["inputs"]["model"] = ["16", 0]
    prompt[APPLY]["inputs"].pop("attention_op")
    status, body = server.post_prompt(prompt)
    assert status == 200 and body["node_errors"] == {}, body


@pytest.mark.parametrize("node, name, value, expected", [
    (SELECT, "op", "xformers:magic", "op: 'xformers:magic' is not one of 'auto', 'xformers',"),
    (SELECT, "op", 3, "op must be a str, one of 'auto',"),
    (SELECT, "mask_mode", "multiply", "mask_mode: 'multiply' is not one of 'multiply output', 'attention bias'"),
    (SELECT, "on_unsupported", "ignore", "on_unsupported: 'ignore' is not one of 'fall back', 'error'"),
    (APPLY, "weight_type", "heavy", "weight_type: 'heavy' is not one of 'linear', 'ease in',"),
    (APPLY, "combine_embeds", "concat ", "combine_embeds: 'concat ' is not one of 'concat', 'add',"),
    (APPLY, "embeds_scaling", True, "embeds_scaling must be a str, one of 'V only',"),
    (LOAD, "ipadapter_file", "ip-adapter_sd15.safetensors",
     "ipadapter_file: 'ip-adapter_sd15.safetensors' is not one of "),
    (LOAD, "ipadapter_file", 5, "ipadapter_file must be a str, one of "),
    (LOAD, "ipadapter_file", {"path": "/etc/passwd"}, "ipadapter_file must be a str, one of "),
])
def test_combo_value_outside_the_list_is_a_400_naming_the_input(server, tiny_models, image, node, name, value,
                                                                 expected):
    prompt = prompt_for(tiny_models, image)
    prompt[node]["inputs"][name] = value
    errors = rejection(server, prompt, node)
    # ComfyUI files the hook's message under every combo input of the node; the message names the wrong one.
    assert {e["type"] for e in errors} == {"custom_validation_failed"}
    assert name in {e["extra_info"]["input_name"] for e in errors}
    assert all(expected in e["details"] for e in errors), errors
    if node == LOAD:
        assert "models/ipadapter" in errors[0]["details"]


def test_other_inputs_keep_comfyuis_own_checks(server, tiny_models, image):
    prompt = prompt_for(tiny_models, image, weight=9.0)
    errors = rejection(server, prompt, APPLY)
    assert [(e["type"], e["extra_info"]["input_name"]) for e in errors] == [("value_bigger_than_max", "weight")]


def test_a_list_that_is_not_a_link_is_comfyuis_400(server, tiny_models, image):
    prompt = prompt_for(tiny_models, image)
    prompt[LOAD]["inputs"]["ipadapter_file"] = ["a", "b", "c"]
    errors = rejection(server, prompt, LOAD)
    assert [(e["type"], e["extra_info"]["input_name"]) for e in errors] == [("bad_linked_input", "ipadapter_file")]


@pytest.mark.parametrize("value, got", [("5", "got int 5"), ("[1, 2]", "got list [1, 2]"),
                                        ('"missing.safetensors"', "'missing.safetensors' is not one of")])
def test_linked_file_name_of_the_wrong_kind_is_the_load_nodes_error(server, tiny_models, image, value, got):
    prompt = prompt_for(tiny_models, image)
    prompt["20"] = {"class_type": "XipaTestComboValue", "inputs": {"value": value}}
    prompt[LOAD]["inputs"]["ipadapter_file"] = ["20", 0]
    error = run_error(server, prompt)
    assert error["node_id"] == LOAD, error
    assert "ipadapter_file" in error["exception_message"] and got in error["exception_message"]
    assert "join()" not in error["exception_message"]


# --- broken adapter files ----------------------------------------------------------------------------------------

def test_int8_adapter_file_names_its_dtype(server, tiny_models, image, adapters):
    tiny = load_file(str(tiny_models.files["ipadapter_base"]))
    save_file({k: (v * 50).to(torch.int8) for k, v in tiny.items()}, str(adapters / "xipa_int8.safetensors"))
    prompt = prompt_for(tiny_models, image)
    prompt[LOAD]["inputs"]["ipadapter_file"] = "xipa_int8.safetensors"
    error = run_error(server, prompt)
    assert error["node_id"] == LOAD
    message = error["exception_message"]
    assert "has dtype int8" in message and "float32, float16, bfloat16" in message and "shape" not in message


@pytest.mark.parametrize("size", [0, 6, 4096])
def test_truncated_adapter_file_advises_a_redownload(server, tiny_models, image, adapters, size):
    name = f"xipa_truncated_{size}.safetensors"
    (adapters / name).write_bytes(tiny_models.files["ipadapter_base"].read_bytes()[:size])
    prompt = prompt_for(tiny_models, image)
    prompt[LOAD]["inputs"]["ipadapter_file"] = name
    error = run_error(server, prompt)
    assert error["node_id"] == LOAD
    message = error["exception_message"]
    assert name in message and "truncated" in message and "re-download it" in message


# --- images and masks ----------------------------------------------------------------------------------------------

def test_half_precision_images_run(server, tiny_models, image):
    prompt = prompt_for(tiny_models, image, image_negative=["22", 0])
    prompt["21"] = {"class_type": "XipaTestCastImage", "inputs": {"image": ["6", 0], "dtype": "float16"}}
    prompt["22"] = {"class_type": "XipaTestCastImage", "inputs": {"image": ["6", 0], "dtype": "bfloat16"}}
    prompt[APPLY]["inputs"]["image"] = ["21", 0]
    run_ok(server, prompt)


def test_integer_image_is_the_apply_nodes_error(server, tiny_models, image):
    prompt = prompt_for(tiny_models, image)
    prompt["21"] = {"class_type": "XipaTestCastImage", "inputs": {"image": ["6", 0], "dtype": "uint8"}}
    prompt[APPLY]["inputs"]["image"] = ["21", 0]
    error = run_error(server, prompt)
    assert error["node_id"] == APPLY
    assert "image has dtype torch.uint8; an IMAGE holds floats in 0..1" in error["exception_message"]


def _masked_latent(server, tiny_models, image, factor: float, mask_mode: str) -> torch.Tensor:
    prompt = saving_latents(prompt_for(tiny_models, image, attn_mask=["24", 0]))
    prompt[SELECT]["inputs"]["mask_mode"] = mask_mode
    prompt["23"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 64}}
    prompt["24"] = {"class_type": "XipaTestScaleMask", "inputs": {"mask": ["23", 0], "factor": factor}}
    (path,) = server.output_files(run_ok(server, prompt)["outputs"], kind="latents")
    return load_file(str(path))["latent_tensor"]


@pytest.mark.parametrize("mask_mode", ["multiply output", "attention bias"])
def test_a_mask_of_seven_acts_as_a_mask_of_one(server, tiny_models, image, mask_mode):
    start = len(server.log_text())
    full = _masked_latent(server, tiny_models, image, 1.0, mask_mode)
    seven = _masked_latent(server, tiny_models, image, 7.0, mask_mode)
    none = _masked_latent(server, tiny_models, image, 0.0, mask_mode)
    assert not torch.equal(full, none)  # the mask reaches the result
    assert torch.equal(seven, full)
    log = server.log_text()[start:]
    assert log.count("attn_mask values range from 7 to 7; clamped to 0..1") == 1


def test_more_masks_than_latents_log_the_rule_once(server, tiny_models, image):
    prompt = prompt_for(tiny_models, image, attn_mask=["26", 0])
    prompt["10"]["inputs"]["batch_size"] = 2
    prompt["25"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["6", 0], "amount": 5}}
    prompt["26"] = {"class_type": "ImageToMask", "inputs": {"image": ["25", 0], "channel": "red"}}
    start = len(server.log_text())
    run_ok(server, prompt)
    rule = ("attn_mask has 5 masks: mask i applies to latent i of the batch; latents beyond the last mask reuse "
            "it, masks beyond the batch are unused")
    assert server.log_text()[start:].count(rule) == 1  # once per application, not per attention call


# --- operator options ------------------------------------------------------------------------------------------

def test_fused_with_error_and_an_operator_that_cannot_fuse_stops(server, tiny_models, image):
    prompt = prompt_for(tiny_models, image)
    prompt[SELECT]["inputs"].update(op="sdpa", fused=True, on_unsupported="error")
    error = run_error(server, prompt)
    assert "fused" in error["exception_message"], error
