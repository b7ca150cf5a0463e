"""The example workflows: every API twin runs on a real server (tiny models in place of the real files), each
UI workflow queues exactly its API twin, and ComfyUI lists the UI workflows (only those) as templates.

The UI files are the source of truth (edit them in ComfyUI, save, then "Export (API)" into
example_workflows/api/); test_ui_workflow_matches_its_api_twin fails when the two drift.
"""
import re

import pytest
from PIL import Image
from xipa_test_support import workflows as wf

SIZE = 64  # tiny run: 64x64 pixels, at most 2 steps


@pytest.fixture(scope="module")
def object_info(comfy_server):
    return comfy_server.object_info()


@pytest.fixture(scope="module")
def uploaded(comfy_server, tmp_path_factory):
    """Each LoadImage file name of the examples -> the name of a generated reference image on the server."""
    names = sorted({n for name in wf.WORKFLOWS for n in wf.image_inputs(wf.load_api(name))})
    folder = tmp_path_factory.mktemp("reference_images")
    result = {}
    for seed, name in enumerate(names):
        path = wf.write_reference_image(folder / f"xipa_reference_{seed}.png", seed=seed)
        result[name] = comfy_server.upload_image(path)["name"]
    return result


@pytest.mark.parametrize("name", wf.WORKFLOWS)
def test_ui_workflow_matches_its_api_twin(name, object_info):
    ui = wf.load_ui(name)
    assert ui["version"] == 0.4
    assert wf.check_ui_links(ui) == []
    for node in ui["nodes"]:
        assert {"id", "type", "pos", "size", "inputs", "outputs", "widgets_values"} <= set(node), node
        assert node["type"] in object_info or node["type"] in wf.VIRTUAL_NODES, node["type"]
    assert wf.ui_to_api(ui, object_info) == wf.load_api(name)


@pytest.mark.parametrize("name", wf.WORKFLOWS)
def test_examples_name_real_model_files(name):
    """Users load these: real file names, never the tiny test models."""
    text = wf.api_path(name).read_text() + wf.ui_path(name).read_text()
    assert "tiny_" not in text and "random_vit" not in text and "taesd" not in text
    api = wf.load_api(name)
    assert any(n["class_type"] == "CheckpointLoaderSimple" for n in api.values())
    assert any(n["class_type"] == "ApplyXformersIPAdapterAttention" for n in api.values())


@pytest.mark.parametrize("name", wf.WORKFLOWS)
def test_api_twin_runs_with_tiny_models(name, comfy_server, tiny_models, uploaded):
    prompt = wf.replace_images(wf.tinyize(wf.load_api(name), tiny_models, size=SIZE, steps=2), uploaded)
    log_start = len(comfy_server.log_text())
    result = comfy_server.run(prompt, timeout=600)
    assert result["status"] == "success", result["message"] or comfy_server.log_tail()
    files = comfy_server.output_files(result["outputs"])
    assert len(files) == 1 and files[0].is_file(), result["outputs"]
    assert files[0].name.startswith(name) and files[0].parent.name == "xformers_ipadapter"
    with Image.open(files[0]) as image:
        assert image.size == (SIZE, SIZE)
    log = comfy_server.log_text()[log_start:]
    assert "Traceback" not in log, log
    ops = re.findall(r"attention op '([^']+)': ran (\S+)", log)
    if name == "patch_model_attention":
        # xformers has no CPU kernels: the requested op falls back to SDPA, and the log says so with the reason
        assert ("xformers", "sdpa") in ops, log
        assert re.search(r"attention op 'xformers': ran sdpa because \S", log), log
    elif name == "two_adapters_regional_masks":
        assert "fused attention not possible, running separate calls" in log, log


def test_only_ui_workflows_are_listed_as_templates(comfy_server):
    templates = comfy_server.get("/workflow_templates").json()
    assert sorted(templates.get(comfy_server.pack_name, [])) == sorted(wf.WORKFLOWS), templates
    for name in wf.WORKFLOWS:  # the frontend fetches them from here
        r = comfy_server.get(f"/api/workflow_templates/{comfy_server.pack_name}/{name}.json")
        assert r.status_code == 200 and r.json() == wf.load_ui(name)


def test_tinyize_splits_checkpoints_and_maps_every_file(tiny_models):
    api = wf.load_api("sd15_image_prompt")
    tiny = wf.tinyize(api, tiny_models, size=SIZE, steps=2)
    kinds = {node_id: n["class_type"] for node_id, n in tiny.items()}
    assert kinds["1"] == "UNETLoader" and kinds["1_clip"] == "CLIPLoader" and kinds["1_vae"] == "VAELoader"
    refs = [v for n in tiny.values() for v in n["inputs"].values() if isinstance(v, list)]
    assert ["1", 1] not in refs and ["1", 2] not in refs
    assert ["1_clip", 0] in refs and ["1_vae", 0] in refs
    assert api["1"]["class_type"] == "CheckpointLoaderSimple"  # the input is not modified
    files = {v for n in tiny.values() for v in n["inputs"].values() if isinstance(v, str)}
    assert tiny_models.name("ipadapter_base") in files and tiny_models.name("clip_vision") in files
    with pytest.raises(KeyError):
        wf.tinyize({"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "other.ckpt"}}},
                   tiny_models)
