"""scripts/migrate_workflow.py's conversion against the real server: a standard-pack API workflow, converted,
runs over /prompt with the tiny models; the node definitions the unit tests use are the server's."""

import json
from pathlib import Path

from harness import migration
from harness.workflows import replace_images, tinyize, write_reference_image

FIXTURES = Path(__file__).resolve().parents[1] / "unit" / "fixtures"


def _shape(info: dict) -> dict:
    """What the conversion reads from a node definition: input order, kinds, outputs (not file lists)."""
    def kind(spec):
        return "COMBO" if isinstance(spec[0], list) else spec[0]
    inputs = {section: sorted((name, kind(spec)) for name, spec in info["input"].get(section, {}).items())
              for section in ("required", "optional")}
    return {"inputs": inputs, "order": info.get("input_order"), "output": info["output"],
            "output_name": info.get("output_name")}


def test_the_unit_tests_node_definitions_are_the_servers(comfy_server):
    real = comfy_server.object_info()
    snapshot = json.loads((FIXTURES / "object_info_pack.json").read_text())
    # every node the conversion produces is registered and has the snapshot's inputs and outputs
    assert set(migration.OUR_NODES) <= set(real) and set(migration.OUR_NODES) <= set(snapshot)
    for node in migration.OUR_NODES:
        assert _shape(snapshot[node]) == _shape(real[node]), (
            f"{node} changed: regenerate tests/unit/fixtures/object_info_pack.json from /object_info")
    # and the UI conversion with the server's definitions equals the one with the snapshot
    ui = json.loads((FIXTURES / "standard_embeds_ui.json").read_text())
    assert migration.convert(ui, real)[0] == migration.convert(ui, snapshot)[0]


def test_converted_standard_workflow_runs_over_prompt(comfy_server, tiny_models, tmp_path):
    standard = json.loads((FIXTURES / "standard_advanced_api.json").read_text())
    converted, report = migration.convert(standard)  # the API form converts by name alone
    assert report.problems == []
    # with the server's lists, the real model file name (not in the tiny server's folder) is flagged
    flagged = migration.convert(standard, comfy_server.object_info())[1].problems
    assert len(flagged) == 1 and flagged[0].startswith("node 2 (IPAdapterModelLoader): ipadapter_file = ")
    reference = write_reference_image(tmp_path / "migration_reference.png", seed=3, size=96)
    uploaded = comfy_server.upload_image(reference)["name"]
    prompt = replace_images(tinyize(converted, tiny_models, size=64, steps=2), {"example.png": uploaded})
    _, messages = comfy_server.run_ws(prompt, timeout=600)
    kinds = [m["type"] for m in messages]
    assert "execution_error" not in kinds, json.dumps(messages)[-3000:] + comfy_server.log_tail()
    executed = {m["data"]["node"] for m in messages if m["type"] == "executed"}
    assert "13" in executed  # SaveImage: the whole converted graph ran, prep and noise included


def test_converted_unified_loader_and_embeds_workflow_runs_over_prompt(comfy_server, tiny_models, tmp_path):
    """The unified-loader pipeline (loader -> encoder -> combine -> apply embeds -> simple apply), converted."""
    standard = json.loads((FIXTURES / "standard_unified_api.json").read_text())
    tail = json.loads((FIXTURES / "standard_advanced_api.json").read_text())
    graph = {k: v for k, v in standard.items() if k not in ("9", "11")}  # style & composition is SDXL-tuned
    graph["1"] = tail["1"]
    graph["2"]["inputs"]["preset"] = "STANDARD (medium strength)"
    graph["8"]["inputs"]["weight_type"] = "linear"
    graph["10"]["inputs"]["model"] = ["8", 0]
    graph.update({f"t{k}": v for k, v in tail.items() if k in ("8", "9", "10", "11", "12", "13")})
    for node in graph.values():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and node in [graph[f"t{k}"] for k in ("8", "9", "10", "11", "12", "13")]:
                source = value[0]
                node["inputs"][name] = [source if source == "1" else ("10" if source == "7" else f"t{source}"),
                                        value[1]]
    converted, report = migration.convert(graph)
    assert report.problems == []
    reference = write_reference_image(tmp_path / "migration_style.png", seed=4, size=96)
    uploaded = comfy_server.upload_image(reference)["name"]
    prompt = replace_images(tinyize(converted, tiny_models, size=64, steps=2),
                            {"style.png": uploaded, "layout.png": uploaded})
    _, messages = comfy_server.run_ws(prompt, timeout=600)
    assert "execution_error" not in [m["type"] for m in messages], \
        json.dumps(messages)[-3000:] + comfy_server.log_tail()
    assert "t13" in {m["data"]["node"] for m in messages if m["type"] == "executed"}
