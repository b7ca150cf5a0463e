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
    tiled = out["11"]  # the tiled node, fed by the loader's pipeline too
    assert tiled["class_type"] == "ApplyXformersIPAdapterTiled"
    assert tiled["inputs"] == {**source["11"]["inputs"], "clip_vision": ["2", 2]}
    assert report.problems == []


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
    assert ui_node(out, 11)["type"] == "XformersIPAdapterWeights" and report.problems == []
    assert out["last_link_id"] == max(links)


def test_ui_needs_node_definitions():
    with pytest.raises(ValueError, match="object_info"):
        migration.convert(load("standard_embeds_ui"))


# --- the nodes added since: batch, weights, regional, params, tiled, enhancer, FaceID --------------------------
# Small standard-pack workflows written here, input names and orders as the standard pack's nodes declare them.

def api(class_type: str, **inputs) -> dict:
    return {"class_type": class_type, "inputs": inputs}


def test_faceid_pipeline_api_gets_clip_vision_and_face_analysis_from_the_loader(info):
    prompt = {
        "1": api("CheckpointLoaderSimple", ckpt_name="sd15.safetensors"),
        "2": api("IPAdapterUnifiedLoaderFaceID", model=["1", 0], preset="FACEID PLUS V2", lora_strength=0.45,
                 provider="CUDA", ipadapter=["9", 1]),
        "3": api("LoadImage", image="face.png"),
        "4": api("IPAdapterFaceID", model=["2", 0], ipadapter=["2", 1], image=["3", 0], weight=0.9,
                 weight_faceidv2=1.5, weight_type="ease in", combine_embeds="average", start_at=0.1, end_at=0.95,
                 embeds_scaling="K+V"),
        "5": api("IPAdapterInsightFaceLoader", provider="ROCM", model_name="antelopev2"),
        "6": api("IPAdapterFaceID", model=["4", 0], ipadapter=["2", 1], image=["3", 0], insightface=["5", 0],
                 weight=0.5, weight_faceidv2=1.0, weight_type="linear", combine_embeds="concat", start_at=0.0,
                 end_at=1.0, embeds_scaling="V only"),
        "9": api("IPAdapterUnifiedLoader", model=["1", 0], preset="PLUS (high strength)"),
    }
    out, report = migration.convert(prompt, info)
    assert report.problems == []
    assert out["2"] == api("XformersIPAdapterUnifiedLoaderFaceID", model=["1", 0], preset="FACEID PLUS V2",
                           lora_strength=0.45, provider="CUDA")  # the reuse-only ipadapter input is dropped
    assert "node 2 (IPAdapterUnifiedLoaderFaceID): ipadapter dropped (this pack's node does not need it)" \
        in report.converted
    assert out["4"] == api("ApplyXformersIPAdapterFaceID", model=["2", 0], ipadapter=["2", 1], image=["3", 0],
                           weight=0.9, weight_faceidv2=1.5, weight_type="ease in", combine_embeds="average",
                           start_at=0.1, end_at=0.95, embeds_scaling="K+V", clip_vision=["2", 2],
                           face_analysis=["2", 3])
    assert out["5"] == api("XformersFaceAnalysisLoader", provider="ROCM", model_name="antelopev2")
    # a connected insightface becomes face_analysis and is kept; clip_vision still comes from the loader
    assert out["6"]["inputs"]["face_analysis"] == ["5", 0] and out["6"]["inputs"]["clip_vision"] == ["2", 2]
    assert "insightface" not in out["6"]["inputs"]


def test_faceid_without_a_faceid_loader_says_what_to_connect(info):
    prompt = {"1": api("IPAdapterModelLoader", ipadapter_file="faceid.bin"),
              "2": api("IPAdapterFaceID", model=["0", 0], ipadapter=["1", 0], image=["0", 0], weight=1.0,
                       weight_faceidv2=1.0, weight_type="linear", combine_embeds="concat", start_at=0.0,
                       end_at=1.0, embeds_scaling="V only")}
    out, report = migration.convert(prompt)
    assert "face_analysis" not in out["2"]["inputs"] and "clip_vision" not in out["2"]["inputs"]
    # clip_vision is optional for FaceID (Plus variants only): only face_analysis is asked for
    assert report.problems == ["node 2 (IPAdapterFaceID): face_analysis is not connected and the ipadapter does not "
                               "come from a unified loader that gives it: connect a Face Analysis Loader (xformers)"]


def test_batch_fed_by_weights_api(info):
    prompt = {
        "1": api("IPAdapterUnifiedLoader", model=["0", 0], preset="STANDARD (medium strength)"),
        "2": api("IPAdapterWeights", weights="1.0, 0.2", timing="ease_in_out", frames=16, start_frame=0,
                 end_frame=12, add_starting_frames=2, add_ending_frames=1, method="shift batches",
                 image=["3", 0]),
        "4": api("IPAdapterBatch", model=["1", 0], ipadapter=["1", 1], image=["2", 3], weight=["2", 0],
                 weight_type="linear", start_at=0.0, end_at=1.0, embeds_scaling="V only", encode_batch_size=8,
                 image_negative=["3", 0]),
        "5": api("IPAdapterPromptScheduleFromWeightsStrategy", weights_strategy=["2", 5], prompt="a cat"),
    }
    out, report = migration.convert(prompt, info)
    assert out["2"] == api("XformersIPAdapterWeights", weights="1.0, 0.2", timing="ease_in_out", frames=16,
                           start_frame=0, end_frame=12, add_starting_frames=2, add_ending_frames=1,
                           method="shift batches", image=["3", 0])
    # the standard batch node always unfolds and has no combine_embeds
    assert out["4"] == api("ApplyXformersIPAdapterBatch", model=["1", 0], ipadapter=["1", 1], image=["2", 3],
                           weight=["2", 0], weight_type="linear", start_at=0.0, end_at=1.0,
                           embeds_scaling="V only", encode_batch_size=8, image_negative=["3", 0],
                           unfold_batch=True, combine_embeds="concat", clip_vision=["1", 2])
    # our Weights has no weights_strategy output: the link out of it is removed and listed
    assert out["5"] == api("IPAdapterPromptScheduleFromWeightsStrategy", prompt="a cat")
    assert report.problems == [
        "node 5 (IPAdapterPromptScheduleFromWeightsStrategy): no equivalent node in this pack; left as it is",
        "node 2 (IPAdapterWeights): its weights_strategy output has no equivalent; the link into node 5 "
        "(IPAdapterPromptScheduleFromWeightsStrategy) input weights_strategy was removed"]


def test_regional_params_api(info):
    def region(image: str, weight: float) -> dict:
        return api("IPAdapterRegionalConditioning", image=[image, 0], image_weight=weight, prompt_weight=1.5,
                   weight_type="style transfer", start_at=0.0, end_at=0.8, mask=[image, 1], positive=["7", 0])
    prompt = {
        "1": api("IPAdapterUnifiedLoader", model=["0", 0], preset="PLUS (high strength)"),
        "2": region("20", 0.7), "3": region("21", -0.5),
        "4": api("IPAdapterCombineParams", params_1=["2", 0], params_2=["3", 0]),
        "5": api("IPAdapterFromParams", model=["1", 0], ipadapter=["1", 1], ipadapter_params=["4", 0],
                 combine_embeds="norm average", embeds_scaling="K+mean(V) w/ C penalty"),
        "6": api("ConditioningCombine", conditioning_1=["2", 1], conditioning_2=["3", 1]),
    }
    out, report = migration.convert(prompt, info)
    assert report.problems == []
    assert out["3"] == api("XformersIPAdapterRegionalConditioning", image=["21", 0], image_weight=-0.5,
                           prompt_weight=1.5, weight_type="style transfer", start_at=0.0, end_at=0.8,
                           mask=["21", 1], positive=["7", 0])
    assert out["4"] == api("XformersIPAdapterCombineParams", params_1=["2", 0], params_2=["3", 0])
    assert out["5"] == api("ApplyXformersIPAdapterFromParams", model=["1", 0], ipadapter=["1", 1],
                           ipadapter_params=["4", 0], combine_embeds="norm average",
                           embeds_scaling="K+mean(V) w/ C penalty", clip_vision=["1", 2])
    assert out["6"] == prompt["6"]  # the regions' prompts keep their output slots


def enhancer(ratio: float) -> dict:
    return api("IPAdapterClipVisionEnhancer", model=["0", 0], ipadapter=["1", 0], image=["2", 0], weight=0.8,
               weight_type="linear", combine_embeds="concat", start_at=0.0, end_at=1.0, embeds_scaling="V only",
               enhance_tiles=3, enhance_ratio=ratio, clip_vision=["3", 0])


def test_enhancer_and_tiled_api(info):
    prompt = {"4": enhancer(1.0), "5": enhancer(0.5),
              "6": api("IPAdapterTiled", model=["4", 0], ipadapter=["1", 0], image=["2", 0], weight=0.6,
                       weight_type="ease out", combine_embeds="average", start_at=0.2, end_at=1.0, sharpening=0.3,
                       embeds_scaling="K+V", clip_vision=["3", 0], attn_mask=["2", 1])}
    out, report = migration.convert(prompt, info)
    assert out["4"] == api("ApplyXformersIPAdapterAttention", model=["0", 0], ipadapter=["1", 0], image=["2", 0],
                           weight=0.8, weight_type="linear", combine_embeds="concat", start_at=0.0, end_at=1.0,
                           embeds_scaling="V only", enhance_tiles=3, clip_vision=["3", 0])
    assert out["5"]["inputs"] == out["4"]["inputs"]  # the ratio is dropped, and said so
    assert len(report.problems) == 1
    assert report.problems[0].startswith("node 5 (IPAdapterClipVisionEnhancer): enhance_ratio = 0.5 has no "
                                         "equivalent")
    assert out["6"] == api("ApplyXformersIPAdapterTiled", model=["4", 0], ipadapter=["1", 0], image=["2", 0],
                           weight=0.6, weight_type="ease out", combine_embeds="average", start_at=0.2, end_at=1.0,
                           sharpening=0.3, embeds_scaling="K+V", clip_vision=["3", 0], attn_mask=["2", 1])


def test_values_outside_our_ranges_and_unknown_inputs_are_listed(info):
    bounds = info["XformersIPAdapterRegionalConditioning"]["input"]["required"]["prompt_weight"][1]
    prompt = {"1": api("IPAdapterRegionalConditioning", image=["0", 0], image_weight=1.0,
                       prompt_weight=bounds["max"] + 1, weight_type="linear", start_at=0.0, end_at=1.0,
                       set_cond_area="default")}
    out, report = migration.convert(prompt, info)
    assert out["1"]["inputs"]["prompt_weight"] == bounds["max"] + 1  # kept for the user to see and fix
    assert "set_cond_area" not in out["1"]["inputs"]
    assert sorted(report.problems) == sorted([
        f"node 1 (IPAdapterRegionalConditioning): prompt_weight = {bounds['max'] + 1!r} is outside this pack's "
        f"range {bounds['min']}..{bounds['max']}; set it by hand",
        "node 1 (IPAdapterRegionalConditioning): input set_cond_area has no equivalent in this pack's "
        "XformersIPAdapterRegionalConditioning; dropped"])
    # without node definitions the API form converts by name alone and cannot tell
    assert migration.convert(prompt)[1].problems == []


# --- UI form of the new nodes -------------------------------------------------------------------------------

SCALAR_KINDS = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def widget_values_by_name(info: dict, node: dict) -> dict:
    """A converted UI node's widget values by our input name (required then optional, widgets only)."""
    spec = {**info[node["type"]]["input"].get("required", {}), **info[node["type"]]["input"].get("optional", {})}
    order = info[node["type"]]["input_order"]
    names = [n for section in ("required", "optional") for n in order.get(section, [])
             if isinstance(spec[n][0], list) or spec[n][0] in SCALAR_KINDS]
    assert len(names) == len(node["widgets_values"])
    return dict(zip(names, node["widgets_values"]))


def ui_workflow(nodes: list[tuple[int, str, list, list, list]], links: list[list]) -> dict:
    """nodes: (id, type, [(input name, type)], [(output name, type)], widgets_values); links as the UI stores
    them. Slots' links are filled in from the links."""
    built = [{"id": node_id, "type": kind, "inputs": [{"name": n, "type": t, "link": None} for n, t in inputs],
              "outputs": [{"name": n, "type": t, "links": []} for n, t in outputs], "widgets_values": values,
              "properties": {"Node name for S&R": kind}}
             for node_id, kind, inputs, outputs, values in nodes]
    by_id = {n["id"]: n for n in built}
    for link_id, origin, origin_slot, target, target_slot, _ in links:
        by_id[origin]["outputs"][origin_slot]["links"].append(link_id)
        by_id[target]["inputs"][target_slot]["link"] = link_id
    return {"last_node_id": max(by_id), "last_link_id": max(link[0] for link in links), "nodes": built,
            "links": links, "groups": [], "config": {}, "extra": {}, "version": 0.4}


APPLY_SLOTS = [("model", "MODEL"), ("ipadapter", "IPADAPTER"), ("image", "IMAGE")]


@pytest.fixture
def faceid_batch_ui():
    return ui_workflow([
        (1, "CheckpointLoaderSimple", [], [("MODEL", "MODEL"), ("CLIP", "CLIP"), ("VAE", "VAE")], ["sd15.ckpt"]),
        (2, "IPAdapterUnifiedLoaderFaceID", [("model", "MODEL"), ("ipadapter", "IPADAPTER")],
         [("MODEL", "MODEL"), ("ipadapter", "IPADAPTER")], ["FACEID PORTRAIT (style transfer)", 0.3, "CPU"]),
        (3, "LoadImage", [], [("IMAGE", "IMAGE"), ("MASK", "MASK")], ["face.png", "image"]),
        (4, "IPAdapterFaceID", [*APPLY_SLOTS, ("image_negative", "IMAGE"), ("attn_mask", "MASK"),
                                ("clip_vision", "CLIP_VISION"), ("insightface", "INSIGHTFACE")],
         [("MODEL", "MODEL"), ("face_image", "IMAGE")], [0.85, 1.2, "ease in-out", "subtract", 0.05, 0.9, "K+V"]),
        (5, "IPAdapterWeights", [("image", "IMAGE")],
         [("weights", "FLOAT"), ("weights_invert", "FLOAT"), ("total_frames", "INT"), ("image_1", "IMAGE"),
          ("image_2", "IMAGE"), ("weights_strategy", "WEIGHTS_STRATEGY")],
         ["0.0, 1.0", "custom", 4, 1, 3, 0, 2, "alternate batches"]),
        (6, "IPAdapterBatch", [*APPLY_SLOTS, ("image_negative", "IMAGE"), ("attn_mask", "MASK"),
                               ("clip_vision", "CLIP_VISION"), ("weight", "FLOAT")], [("MODEL", "MODEL")],
         [1.0, "ease out", 0.0, 0.75, "K+V w/ C penalty", 2]),
        (7, "IPAdapterCombineWeights", [("weights_1", "FLOAT"), ("weights_2", "WEIGHTS_STRATEGY")],
         [("weights", "FLOAT"), ("count", "INT")], []),
        (8, "IPAdapterInsightFaceLoader", [], [("INSIGHTFACE", "INSIGHTFACE")], ["CUDA", "buffalo_l"]),
    ], [[1, 1, 0, 2, 0, "MODEL"], [2, 2, 0, 4, 0, "MODEL"], [3, 2, 1, 4, 1, "IPADAPTER"], [4, 3, 0, 4, 2, "IMAGE"],
        [5, 3, 0, 5, 0, "IMAGE"], [6, 4, 0, 6, 0, "MODEL"], [7, 2, 1, 6, 1, "IPADAPTER"], [8, 5, 3, 6, 2, "IMAGE"],
        [9, 5, 0, 6, 6, "FLOAT"], [10, 5, 5, 7, 1, "WEIGHTS_STRATEGY"], [11, 3, 1, 6, 4, "MASK"]])


def test_ui_faceid_and_batch_widgets_follow_our_order(info, faceid_batch_ui):
    out, report = migration.convert(faceid_batch_ui, info)
    assert [ui_node(out, i)["type"] for i in (2, 4, 5, 6, 8)] == [
        "XformersIPAdapterUnifiedLoaderFaceID", "ApplyXformersIPAdapterFaceID", "XformersIPAdapterWeights",
        "ApplyXformersIPAdapterBatch", "XformersFaceAnalysisLoader"]
    assert widget_values_by_name(info, ui_node(out, 2)) == dict(
        preset="FACEID PORTRAIT (style transfer)", lora_strength=0.3, provider="CPU")
    assert widget_values_by_name(info, ui_node(out, 4)) == dict(
        weight=0.85, weight_faceidv2=1.2, weight_type="ease in-out", combine_embeds="subtract", start_at=0.05,
        end_at=0.9, embeds_scaling="K+V")
    assert widget_values_by_name(info, ui_node(out, 5)) == dict(
        weights="0.0, 1.0", timing="custom", frames=4, start_frame=1, end_frame=3, add_starting_frames=0,
        add_ending_frames=2, method="alternate batches")
    batch = widget_values_by_name(info, ui_node(out, 6))
    assert {k: batch[k] for k in ("weight", "weight_type", "start_at", "end_at", "embeds_scaling",
                                  "encode_batch_size", "unfold_batch", "combine_embeds")} == dict(
        weight=1.0, weight_type="ease out", start_at=0.0, end_at=0.75, embeds_scaling="K+V w/ C penalty",
        encode_batch_size=2, unfold_batch=True, combine_embeds="concat")
    assert widget_values_by_name(info, ui_node(out, 8)) == dict(model_name="buffalo_l", provider="CUDA")
    assert "node 7 (IPAdapterCombineWeights): no equivalent node in this pack; left as it is" in report.problems
    assert ("node 5 (IPAdapterWeights): its weights_strategy output has no equivalent; the link into node 7 "
            "(IPAdapterCombineWeights) was removed") in report.problems
    assert len(report.problems) == 2, report.problems


def test_ui_faceid_and_batch_links(info, faceid_batch_ui):
    out, _ = migration.convert(faceid_batch_ui, info)
    links = {link[0]: link for link in out["links"]}
    assert migration.convert(faceid_batch_ui, info)[0] == out  # the first conversion left its input as it was
    problems = check_ui_links(out)
    # node 7 is left as it is: its WEIGHTS_STRATEGY input lost its link; nothing else is inconsistent
    assert problems == [], problems
    faceid, batch, loader = ui_node(out, 4), ui_node(out, 6), ui_node(out, 2)
    assert [o["type"] for o in loader["outputs"]] == info["XformersIPAdapterUnifiedLoaderFaceID"]["output"]
    face_link = links[slot_link(faceid, "face_analysis")]
    assert face_link[1:3] == [2, 3] and face_link[5] == "XFORMERS_FACE_ANALYSIS"
    assert links[slot_link(faceid, "clip_vision")][1:3] == [2, 2]
    assert links[slot_link(faceid, "ipadapter")][5] == "XFORMERS_IPADAPTER"
    # the loader's (reuse-only) ipadapter input had no link here; Batch's weight stays a link from weights
    weight = next(s for s in batch["inputs"] if s["name"] == "weight")
    assert links[weight["link"]][1:3] == [5, 0] and weight["widget"] == {"name": "weight"}
    assert links[slot_link(batch, "image")][1:3] == [5, 3]
    assert links[slot_link(batch, "attn_mask")][1:3] == [3, 1]
    assert links[slot_link(batch, "clip_vision")][1:3] == [2, 2]  # FaceID loader: clip_vision is slot 2 too
    assert 10 not in links and ui_node(out, 7)["inputs"][1]["link"] is None
    assert all(o["links"] == [] for o in ui_node(out, 5)["outputs"][4:])
    assert len(ui_node(out, 5)["outputs"]) == len(info["XformersIPAdapterWeights"]["output"])
