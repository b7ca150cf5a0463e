"""scripts/harness/migration.py on hand-written standard-pack workflows (tests/unit/fixtures): API and UI forms.

This pack's node definitions come from tests/unit/fixtures/object_info_pack.json, a snapshot of /object_info that
tests/host/test_migration_schema.py compares with the real nodes."""

import json
from pathlib import Path

import pytest

from harness import migration
from harness.workflows import check_ui_links

FIXTURES = Path(__file__).parent / "fixtures"


def load(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


@pytest.fixture(scope="module")
def info():
    return load("object_info_pack")


def test_advanced_api_workflow_keeps_links_and_values(info):
    out, report = migration.convert(load("standard_advanced_api"), info)
    assert report.problems == []
    apply = out["7"]
    assert apply["class_type"] == "ApplyXformersIPAdapterAttention"
    assert apply["inputs"] == {"model": ["1", 0], "ipadapter": ["2", 0], "image": ["5", 0], "weight": 0.8,
                               "weight_type": "ease in-out", "combine_embeds": "concat", "start_at": 0.0,
                               "end_at": 0.9, "embeds_scaling": "K+V", "image_negative": ["6", 0],
                               "clip_vision": ["3", 0]}
    assert out["2"] == {"class_type": "LoadXformersIPAdapter",
                        "inputs": {"ipadapter_file": "ip-adapter_sd15.safetensors"}}
    assert out["5"] == {"class_type": "XformersPrepImageForClipVision", "inputs": {
        "image": ["4", 0], "interpolation": "LANCZOS", "crop_position": "top", "sharpening": 0.15}}
    assert out["6"] == {"class_type": "XformersIPAdapterNoise", "inputs": {
        "type": "dissolve", "strength": 0.6, "blur": 2, "image": ["5", 0]}}
    assert out["11"] == load("standard_advanced_api")["11"]  # core nodes untouched


def test_unified_pipeline_api_gets_clip_vision_from_the_loader(info):
    source = load("standard_unified_api")
    out, report = migration.convert(source, info)
    assert out["2"] == {"class_type": "XformersIPAdapterUnifiedLoader",
                        "inputs": {"model": ["1", 0], "preset": "PLUS (high strength)"}}
    for node_id in ("5", "6", "9", "10"):
        assert out[node_id]["inputs"]["clip_vision"] == ["2", 2], node_id
    assert "clip_vision" not in out["8"]["inputs"]  # Apply Embeds has none
    assert out["7"] == {"class_type": "XformersIPAdapterCombineEmbeds",
                        "inputs": {"embeds_1": ["5", 0], "embeds_2": ["6", 0], "method": "max"}}
    assert out["8"]["inputs"]["pos_embeds"] == ["7", 0] and out["8"]["inputs"]["neg_embeds"] == ["5", 1]
    simple = out["10"]
    assert simple["class_type"] == "ApplyXformersIPAdapterAttention"
    assert simple["inputs"]["weight_type"] == "ease out"  # "prompt is more important"
    assert (simple["inputs"]["combine_embeds"], simple["inputs"]["embeds_scaling"]) == ("concat", "V only")
    assert out["9"]["inputs"]["expand_style"] is True and out["9"]["inputs"]["combine_embeds"] == "average"
    assert out["11"] == source["11"]
    assert report.problems == ["node 11 (IPAdapterTiled): no equivalent node in this pack; left as it is"]


def test_missing_clip_vision_and_unknown_values_are_reported(info):
    prompt = load("standard_advanced_api")
    del prompt["7"]["inputs"]["clip_vision"]
    prompt["5"]["inputs"]["interpolation"] = "MITCHELL"
    out, report = migration.convert(prompt, info)
    assert "clip_vision" not in out["7"]["inputs"]
    assert any(p.startswith("node 7 (IPAdapterAdvanced): clip_vision is not connected") for p in report.problems)
    assert any(p.startswith("node 5 (PrepImageForClipVision): interpolation = 'MITCHELL' has no equivalent")
               for p in report.problems)


def test_api_conversion_never_changes_its_input(info):
    source = load("standard_unified_api")
    snapshot = json.dumps(source, sort_keys=True)
    migration.convert(source, info)
    assert json.dumps(source, sort_keys=True) == snapshot


def ui_node(workflow: dict, node_id: int) -> dict:
    return next(n for n in workflow["nodes"] if n["id"] == node_id)


def slot_link(node: dict, name: str):
    return next(s["link"] for s in node["inputs"] if s["name"] == name)


def test_ui_workflow_widget_values_follow_this_packs_order(info):
    out, _ = migration.convert(load("standard_embeds_ui"), info)
    embeds = ui_node(out, 7)
    assert embeds["type"] == "ApplyXformersIPAdapterEmbeds"
    order = [n for n in info["ApplyXformersIPAdapterEmbeds"]["input_order"]["required"]
             if n in ("weight", "weight_type", "start_at", "end_at", "embeds_scaling")]
    standard = dict(weight=0.8, weight_type="ease out", start_at=0.0, end_at=0.85, embeds_scaling="K+V w/ C penalty")
    assert embeds["widgets_values"][:5] == [standard[n] for n in order]
    simple = ui_node(out, 9)  # simple IPAdapter: weight, start_at, end_at, weight_type -> ours
    values = dict(zip(["weight", "weight_type", "start_at", "end_at", "combine_embeds", "embeds_scaling"],
                      simple["widgets_values"]))
    assert values == dict(weight=0.65, weight_type="style transfer", start_at=0.0, end_at=1.0,
                          combine_embeds="concat", embeds_scaling="V only")
    assert ui_node(out, 10)["widgets_values"] == ["shuffle", 0.4, 3]
    assert ui_node(out, 12)["widgets_values"] == [7, "fixed", 20, 6.0, "euler", "normal", 1.0]  # core node kept


def test_ui_workflow_links_follow_the_new_sockets(info):
    out, report = migration.convert(load("standard_embeds_ui"), info)
    links = {link[0]: link for link in out["links"]}
    # every link ends at the socket of the name it fed before, at that socket's new position
    for node in out["nodes"]:
        for index, slot in enumerate(node.get("inputs") or []):
            if slot.get("link") is not None:
                assert links[slot["link"]][3:5] == [node["id"], index], (node["id"], slot["name"])
    assert [p for p in check_ui_links(out) if "-> *" not in p] == []  # a Reroute's input is typed "*"
    encoder, loader = ui_node(out, 4), ui_node(out, 2)
    assert loader["outputs"][2]["name"] == "clip_vision" and loader["outputs"][2]["type"] == "CLIP_VISION"
    clip_link = links[slot_link(encoder, "clip_vision")]
    assert clip_link[1:3] == [2, 2] and clip_link[5] == "CLIP_VISION"
    assert links[slot_link(ui_node(out, 9), "clip_vision")][1:3] == [2, 2]  # found through the Reroute
    assert links[slot_link(encoder, "ipadapter")][5] == "XFORMERS_IPADAPTER"
    assert links[slot_link(ui_node(out, 5), "embeds_1")][5] == "XFORMERS_IPADAPTER_EMBEDS"
    # the CLIP vision link Apply Embeds does not need is gone from both ends
    assert all(link[1] != 6 for link in out["links"]) and ui_node(out, 6)["outputs"][0]["links"] == []
    assert "node 11 (IPAdapterWeights): no equivalent node in this pack; left as it is" in report.problems
    assert out["last_link_id"] == max(links)


def test_ui_needs_node_definitions():
    with pytest.raises(ValueError, match="object_info"):
        migration.convert(load("standard_embeds_ui"))
