"""The example workflows: every API twin runs on a real server (tiny models in place of the real files), each
UI workflow queues exactly its API twin, and ComfyUI lists the UI workflows (only those) as templates.

The UI files are the source of truth (edit them in ComfyUI, save, then "Export (API)" into
example_workflows/api/); test_ui_workflow_matches_its_api_twin fails when the two drift.
"""
import json
import os
import re
import subprocess
import sys

import pytest
from PIL import Image
from harness import workflows as wf

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
    assert any(n["class_type"] in wf.MODEL_LOADERS for n in api.values())
    assert any(n["class_type"].startswith("ApplyXformersIPAdapter") for n in api.values())


@pytest.mark.parametrize("name", wf.sampled())  # wf.NOT_SAMPLED says which are only checked, and why
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


def test_readme_headless_example_runs(comfy_server, tiny_models, uploaded, tmp_path):
    """The README's standard-library API example, as printed, against the test server (tiny models)."""
    readme = (wf.REPO_ROOT / "README.md").read_text()
    section = readme.split("## Headless API example", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    workflow = tmp_path / "workflow.json"
    tiny = wf.tinyize(wf.load_api(wf.BASIC), tiny_models, size=SIZE, steps=2)
    tiny["10"]["inputs"]["seed"] = 4242  # not a cached result
    workflow.write_text(json.dumps(tiny))
    replacements = {"SERVER": f"127.0.0.1:{comfy_server.port}", "WORKFLOW": str(workflow),
                    "IMAGE": uploaded["example.png"]}
    for name, value in replacements.items():
        code, count = re.subn(rf'^{name} = "[^"]*"', f"{name} = {json.dumps(value)}", code, flags=re.M)
        assert count == 1, name
    script = tmp_path / "headless.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          cwd=wf.REPO_ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr + comfy_server.log_tail()
    saved = re.findall(r"^saved: (\S*) (\S+)$", proc.stdout, re.M)
    assert len(saved) == 1 and saved[0][1].startswith("sd15_image_prompt"), proc.stdout
    assert (comfy_server.output_dir / saved[0][0] / saved[0][1]).is_file()


NODE_IDS = ("LoadXformersIPAdapter", "SelectXformersAttentionOp", "ApplyXformersIPAdapterAttention",
            "PatchXformersModelAttention")


@pytest.mark.parametrize("node_id", NODE_IDS)
def test_node_help_page_is_served_where_the_frontend_looks(node_id, comfy_server, object_info):
    """The frontend's node help fetches /extensions/<custom node folder>/docs/<node id>.md (after trying
    docs/<node id>/<locale>.md) for nodes whose python_module is custom_nodes.<folder>."""
    module = object_info[node_id]["python_module"]
    assert module == f"custom_nodes.{comfy_server.pack_name}"
    r = comfy_server.get(f"/extensions/{comfy_server.pack_name}/docs/{node_id}.md")
    assert r.status_code == 200, r.text
    text = r.text
    assert text.startswith(f"# {object_info[node_id]['display_name']}\n")
    for name in object_info[node_id]["input_order"].get("required", []):
        assert f"`{name}`" in text, name
    assert object_info[node_id]["description"]


@pytest.mark.browser
def test_frontend_loads_each_ui_workflow_and_queues_its_api_twin(comfy_server):
    """The real frontend (headless Chromium): app.loadGraphData(ui) then app.graphToPrompt() gives exactly the
    API twin, with no page errors."""
    from playwright.sync_api import sync_playwright

    chromium = os.environ.get("XIPA_CHROMIUM", "/usr/bin/chromium")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
    comfy_server.http.post(comfy_server.base_url + "/settings", json={"Comfy.TutorialCompleted": True},
                           timeout=30).raise_for_status()
    errors: list[str] = []
    with sync_playwright() as api:
        browser = api.chromium.launch(executable_path=chromium, headless=True, args=args)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.route("**/*", lambda route: route.continue_()
                       if route.request.url.startswith(comfy_server.base_url) else route.abort())
            page.on("pageerror", lambda err: errors.append(str(err)))
            page.goto(comfy_server.base_url)
            page.wait_for_function("() => window.app?.graph && window.LiteGraph?.registered_node_types?."
                                   "ApplyXformersIPAdapterAttention", timeout=90_000)
            for name in wf.WORKFLOWS:
                prompt = page.evaluate("""async (workflow) => {
                    await app.loadGraphData(workflow);
                    const { output } = await app.graphToPrompt();
                    for (const node of Object.values(output)) delete node._meta;  // titles, ignored by /prompt
                    const nodes = app.graph._nodes.map((n) => n.type);
                    return { output, nodes };
                }""", wf.load_ui(name))
                assert prompt["output"] == wf.load_api(name), name
                assert sorted(prompt["nodes"]) == sorted(n["type"] for n in wf.load_ui(name)["nodes"]), name
        finally:
            browser.close()
    assert not errors, errors
