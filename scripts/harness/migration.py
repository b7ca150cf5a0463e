"""Standard-pack (ComfyUI_IPAdapter_plus) workflows -> this pack's nodes: the logic of scripts/migrate_workflow.py.

Two forms: the API form (``{id: {"class_type", "inputs"}}``, what ``POST /prompt`` takes) is converted by input
name alone; the UI form (``{"nodes", "links", ...}``, a saved workflow) also needs this pack's node definitions
(a server's ``/object_info``) because a UI node stores its widget values as a list in the order of the node's
inputs, and its sockets and links by position. The standard pack's input order below was read from its node
definitions (IPAdapterPlus.py, INPUT_TYPES of each class; the UI lists required then optional inputs).

Nothing here is shipped (scripts/harness/ is left out of the registry archive); nothing is written to model folders.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

# The standard pack's inputs in its order: (name, socket type); WIDGET for values kept in widgets_values.
WIDGET = "widget"
_APPLY_TAIL = [("image_negative", "IMAGE"), ("attn_mask", "MASK"), ("clip_vision", "CLIP_VISION")]
_APPLY_HEAD = [("model", "MODEL"), ("ipadapter", "IPADAPTER"), ("image", "IMAGE"), ("weight", WIDGET),
               ("weight_type", WIDGET)]
_WINDOW = [("start_at", WIDGET), ("end_at", WIDGET)]
STANDARD_INPUTS: dict[str, list[tuple[str, str]]] = {
    "IPAdapterAdvanced": [*_APPLY_HEAD, ("combine_embeds", WIDGET), *_WINDOW, ("embeds_scaling", WIDGET),
                          *_APPLY_TAIL],
    "IPAdapter": [("model", "MODEL"), ("ipadapter", "IPADAPTER"), ("image", "IMAGE"), ("weight", WIDGET),
                  *_WINDOW, ("weight_type", WIDGET), ("attn_mask", "MASK")],
    "IPAdapterUnifiedLoader": [("model", "MODEL"), ("preset", WIDGET), ("ipadapter", "IPADAPTER")],
    "IPAdapterModelLoader": [("ipadapter_file", WIDGET)],
    "IPAdapterEncoder": [("ipadapter", "IPADAPTER"), ("image", "IMAGE"), ("weight", WIDGET), ("mask", "MASK"),
                         ("clip_vision", "CLIP_VISION")],
    "IPAdapterCombineEmbeds": [("embed1", "EMBEDS"), ("method", WIDGET), ("embed2", "EMBEDS"),
                               ("embed3", "EMBEDS"), ("embed4", "EMBEDS"), ("embed5", "EMBEDS")],
    "IPAdapterEmbeds": [("model", "MODEL"), ("ipadapter", "IPADAPTER"), ("pos_embed", "EMBEDS"), ("weight", WIDGET),
                        ("weight_type", WIDGET), *_WINDOW, ("embeds_scaling", WIDGET), ("neg_embed", "EMBEDS"),
                        ("attn_mask", "MASK"), ("clip_vision", "CLIP_VISION")],
    "IPAdapterStyleComposition": [("model", "MODEL"), ("ipadapter", "IPADAPTER"), ("image_style", "IMAGE"),
                                  ("image_composition", "IMAGE"), ("weight_style", WIDGET),
                                  ("weight_composition", WIDGET), ("expand_style", WIDGET),
                                  ("combine_embeds", WIDGET), *_WINDOW, ("embeds_scaling", WIDGET), *_APPLY_TAIL],
    "PrepImageForClipVision": [("image", "IMAGE"), ("interpolation", WIDGET), ("crop_position", WIDGET),
                               ("sharpening", WIDGET)],
    "IPAdapterNoise": [("type", WIDGET), ("strength", WIDGET), ("blur", WIDGET), ("image_optional", "IMAGE")],
    "IPAdapterBatch": [*_APPLY_HEAD, *_WINDOW, ("embeds_scaling", WIDGET), ("encode_batch_size", WIDGET),
                       *_APPLY_TAIL],
    "IPAdapterTiled": [*_APPLY_HEAD, ("combine_embeds", WIDGET), *_WINDOW, ("sharpening", WIDGET),
                       ("embeds_scaling", WIDGET), *_APPLY_TAIL],
    "IPAdapterClipVisionEnhancer": [*_APPLY_HEAD, ("combine_embeds", WIDGET), *_WINDOW, ("embeds_scaling", WIDGET),
                                    ("enhance_tiles", WIDGET), ("enhance_ratio", WIDGET), *_APPLY_TAIL],
    "IPAdapterFromParams": [("model", "MODEL"), ("ipadapter", "IPADAPTER"), ("ipadapter_params", "IPADAPTER_PARAMS"),
                            ("combine_embeds", WIDGET), ("embeds_scaling", WIDGET), ("image_negative", "IMAGE"),
                            ("clip_vision", "CLIP_VISION")],
    "IPAdapterRegionalConditioning": [("image", "IMAGE"), ("image_weight", WIDGET), ("prompt_weight", WIDGET),
                                      ("weight_type", WIDGET), *_WINDOW, ("mask", "MASK"),
                                      ("positive", "CONDITIONING"), ("negative", "CONDITIONING")],
    "IPAdapterCombineParams": [(f"params_{i}", "IPADAPTER_PARAMS") for i in range(1, 6)],
    "IPAdapterWeights": [("weights", WIDGET), ("timing", WIDGET), ("frames", WIDGET), ("start_frame", WIDGET),
                         ("end_frame", WIDGET), ("add_starting_frames", WIDGET), ("add_ending_frames", WIDGET),
                         ("method", WIDGET), ("image", "IMAGE")],
    "IPAdapterInsightFaceLoader": [("provider", WIDGET), ("model_name", WIDGET)],
    "IPAdapterFaceID": [("model", "MODEL"), ("ipadapter", "IPADAPTER"), ("image", "IMAGE"), ("weight", WIDGET),
                        ("weight_faceidv2", WIDGET), ("weight_type", WIDGET), ("combine_embeds", WIDGET), *_WINDOW,
                        ("embeds_scaling", WIDGET), *_APPLY_TAIL, ("insightface", "INSIGHTFACE")],
    "IPAdapterUnifiedLoaderFaceID": [("model", "MODEL"), ("preset", WIDGET), ("lora_strength", WIDGET),
                                     ("provider", WIDGET), ("ipadapter", "IPADAPTER")],
}

# Every other node id the standard pack registers: reported as not converted.
OTHER_STANDARD_NODES = frozenset({
    "IPAdapterUnifiedLoaderCommunity", "IPAdapterFaceIDKolors", "IPAAdapterFaceIDBatch", "IPAdapterTiledBatch",
    "IPAdapterEmbedsBatch", "IPAdapterStyleCompositionBatch", "IPAdapterMS", "IPAdapterClipVisionEnhancerBatch",
    "IPAdapterPreciseStyleTransfer", "IPAdapterPreciseStyleTransferBatch", "IPAdapterPreciseComposition",
    "IPAdapterPreciseCompositionBatch", "IPAdapterSaveEmbeds", "IPAdapterLoadEmbeds", "IPAdapterWeightsFromStrategy",
    "IPAdapterPromptScheduleFromWeightsStrategy", "IPAdapterCombineWeights",
})

# Socket types of the standard pack -> ours (link types in UI workflows).
TYPE_RENAMES = {"IPADAPTER": "XFORMERS_IPADAPTER", "EMBEDS": "XFORMERS_IPADAPTER_EMBEDS",
                "IPADAPTER_PARAMS": "XFORMERS_IPADAPTER_PARAMS", "INSIGHTFACE": "XFORMERS_FACE_ANALYSIS"}


@dataclass(frozen=True)
class NodeMapping:
    target: str
    renames: Mapping[str, str] = field(default_factory=dict)  # standard input -> ours (others keep their name)
    values: Mapping[str, Mapping[Any, Any]] = field(default_factory=dict)  # value translations per input
    added: Mapping[str, Any] = field(default_factory=dict)  # our inputs the standard node lacks: fixed values
    unneeded: frozenset = frozenset()  # standard inputs this pack does without (dropped, said so)
    # standard inputs with no input here whose effect this pack has at one value: (that value, what we do);
    # dropped when they hold it, listed otherwise
    fixed: Mapping[str, tuple[Any, str]] = field(default_factory=dict)
    # our inputs the standard node may take from a unified loader's pipeline -> whether ours requires them
    from_pipeline: Mapping[str, bool] = field(default_factory=dict)
    lost_outputs: Mapping[int, str] = field(default_factory=dict)  # standard output slots with no equivalent


_APPLY_DEFAULTS = {"combine_embeds": "concat", "embeds_scaling": "V only"}
_CLIP_VISION = {"clip_vision": True}
MAPPINGS: dict[str, NodeMapping] = {
    "IPAdapterAdvanced": NodeMapping("ApplyXformersIPAdapterAttention", from_pipeline=_CLIP_VISION),
    # the simple node's three weight types are the advanced node's linear / ease out / style transfer
    "IPAdapter": NodeMapping("ApplyXformersIPAdapterAttention", from_pipeline=_CLIP_VISION, added=_APPLY_DEFAULTS,
                             values={"weight_type": {"standard": "linear", "prompt is more important": "ease out",
                                                     "style transfer": "style transfer"}}),
    "IPAdapterUnifiedLoader": NodeMapping("XformersIPAdapterUnifiedLoader"),
    "IPAdapterModelLoader": NodeMapping("LoadXformersIPAdapter"),
    "IPAdapterEncoder": NodeMapping("XformersIPAdapterEncoder", from_pipeline=_CLIP_VISION),
    "IPAdapterCombineEmbeds": NodeMapping("XformersIPAdapterCombineEmbeds",
                                          renames={f"embed{i}": f"embeds_{i}" for i in range(1, 6)}),
    "IPAdapterEmbeds": NodeMapping("ApplyXformersIPAdapterEmbeds",
                                   renames={"pos_embed": "pos_embeds", "neg_embed": "neg_embeds"},
                                   unneeded=frozenset({"clip_vision"})),
    "IPAdapterStyleComposition": NodeMapping("ApplyXformersIPAdapterStyleComposition", from_pipeline=_CLIP_VISION),
    "PrepImageForClipVision": NodeMapping("XformersPrepImageForClipVision"),
    "IPAdapterNoise": NodeMapping("XformersIPAdapterNoise", renames={"image_optional": "image"}),
    # the standard batch node always unfolds (image i -> frame i); it has no combine_embeds
    "IPAdapterBatch": NodeMapping("ApplyXformersIPAdapterBatch", from_pipeline=_CLIP_VISION,
                                  added={"unfold_batch": True, "combine_embeds": "concat"}),
    "IPAdapterTiled": NodeMapping("ApplyXformersIPAdapterTiled", from_pipeline=_CLIP_VISION),
    # the enhancer is Apply's enhance_tiles; its tiles' encoding follows the plain one at full strength, which is
    # the standard enhance_ratio 1 for one reference image (docs: README, Apply's enhance_tiles)
    "IPAdapterClipVisionEnhancer": NodeMapping(
        "ApplyXformersIPAdapterAttention", from_pipeline=_CLIP_VISION,
        fixed={"enhance_ratio": (1.0, "this pack keeps the plain encoding at full strength, next to the tiles' "
                                      "(the standard enhance_ratio 1 with one reference image)")}),
    "IPAdapterFromParams": NodeMapping("ApplyXformersIPAdapterFromParams", from_pipeline=_CLIP_VISION),
    "IPAdapterRegionalConditioning": NodeMapping("XformersIPAdapterRegionalConditioning"),
    "IPAdapterCombineParams": NodeMapping("XformersIPAdapterCombineParams"),
    "IPAdapterWeights": NodeMapping("XformersIPAdapterWeights", lost_outputs={5: "weights_strategy"}),
    "IPAdapterInsightFaceLoader": NodeMapping("XformersFaceAnalysisLoader"),
    "IPAdapterFaceID": NodeMapping("ApplyXformersIPAdapterFaceID", renames={"insightface": "face_analysis"},
                                   from_pipeline={"clip_vision": False, "face_analysis": True}),
    # the standard loader's ipadapter input only lets it reuse files a previous loader loaded
    "IPAdapterUnifiedLoaderFaceID": NodeMapping("XformersIPAdapterUnifiedLoaderFaceID",
                                                unneeded=frozenset({"ipadapter"})),
}
# Standard loaders whose ipadapter carries more models; our loaders give them as outputs: input name -> our slot.
PIPELINE_OUTPUTS: dict[str, dict[str, int]] = {
    "IPAdapterUnifiedLoader": {"clip_vision": 2},  # ours: model, ipadapter, clip_vision
    "IPAdapterUnifiedLoaderFaceID": {"clip_vision": 2, "face_analysis": 3},  # ..., clip_vision, face_analysis
}
PIPELINE_HINTS = {"clip_vision": "connect a CLIP Vision loader",
                  "face_analysis": "connect a Face Analysis Loader (xformers)"}
PASS_THROUGH = frozenset({"Reroute"})  # UI-only nodes that forward their one input
NUMBER_KINDS = ("INT", "FLOAT")


@dataclass
class Report:
    converted: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"converted: {c}" for c in self.converted] + [f"NOT converted: {p}" for p in self.problems]
        return "\n".join(lines) if lines else "nothing to convert: no standard-pack node found"


def is_ui_workflow(data: Mapping) -> bool:
    return isinstance(data.get("nodes"), list) and "links" in data


def _input_spec(object_info: Optional[Mapping], node: str, name: str) -> Optional[list]:
    if not object_info or node not in object_info:
        return None
    inputs = object_info[node]["input"]
    return {**inputs.get("required", {}), **inputs.get("optional", {})}.get(name)


def _combo_options(spec: list) -> Optional[list]:
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO" and len(spec) > 1:
        return spec[1].get("options")
    return None


def _out_of_range(spec: list, value: Any) -> Optional[str]:
    """'min..max' of a number input the value lies outside of, else None."""
    if spec[0] not in NUMBER_KINDS or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    limits = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    low, high = limits.get("min"), limits.get("max")
    if (low is not None and value < low) or (high is not None and value > high):
        return f"{low}..{high}"
    return None


def _knows_inputs(object_info: Optional[Mapping], mapping: NodeMapping) -> bool:
    return bool(object_info) and mapping.target in object_info


def _input_name(mapping: NodeMapping, where: str, name: str, object_info: Optional[Mapping],
                report: Report) -> Optional[str]:
    """Our name for a standard input, or None (said so) when it is dropped."""
    if name in mapping.unneeded:
        report.converted.append(f"{where}: {name} dropped (this pack's node does not need it)")
        return None
    ours = mapping.renames.get(name, name)
    if _knows_inputs(object_info, mapping) and _input_spec(object_info, mapping.target, ours) is None:
        report.problems.append(f"{where}: input {name} has no equivalent in this pack's {mapping.target}; dropped")
        return None
    return ours


def _translate(mapping: NodeMapping, where: str, name: str, value: Any, object_info: Optional[Mapping],
               report: Report) -> Optional[tuple[str, Any]]:
    """(our input name, our value) for one widget value of a standard node; None when it is dropped."""
    if name in mapping.fixed:
        kept, behaviour = mapping.fixed[name]
        if value != kept:
            report.problems.append(f"{where}: {name} = {value!r} has no equivalent ({behaviour}); dropped, "
                                   f"which acts as {name} = {kept!r}")
        return None
    ours = _input_name(mapping, where, name, object_info, report)
    if ours is None:
        return None
    table = mapping.values.get(name)
    if table is not None and value in table:
        value = table[value]
    spec = _input_spec(object_info, mapping.target, ours)
    if spec is None:
        return ours, value
    options = _combo_options(spec)
    if options and value not in options:  # an empty list: a model-file list unknown here
        report.problems.append(f"{where}: {ours} = {value!r} has no equivalent in this pack (choices: "
                               f"{', '.join(map(repr, options))}); set it by hand")
    limits = _out_of_range(spec, value)
    if limits is not None:
        report.problems.append(f"{where}: {ours} = {value!r} is outside this pack's range {limits}; set it by hand")
    return ours, value


def _mapping_for(kind: str, where: str, report: Report) -> Optional[NodeMapping]:
    """The conversion of a node type; None (reported for the standard pack's other nodes) to leave it."""
    if kind in OTHER_STANDARD_NODES:
        report.problems.append(f"{where}: no equivalent node in this pack; left as it is")
    return MAPPINGS.get(kind)


def _pipeline_problem(where: str, name: str) -> str:
    return (f"{where}: {name} is not connected and the ipadapter does not come from a unified loader that "
            f"gives it: {PIPELINE_HINTS[name]}")


def _lost_output_name(mapping: NodeMapping, slot: int, object_info: Optional[Mapping]) -> Optional[str]:
    if slot in mapping.lost_outputs:
        return mapping.lost_outputs[slot]
    if _knows_inputs(object_info, mapping) and slot >= len(object_info[mapping.target]["output"]):
        return f"output {slot}"
    return None


# --- API form ---------------------------------------------------------------------------------------------

def _api_source(prompt: Mapping[str, dict], value: Any) -> Optional[tuple[str, int]]:
    if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:
        return str(value[0]), int(value[1])
    return None


def convert_api(prompt: Mapping[str, dict], object_info: Optional[Mapping] = None) -> tuple[dict, Report]:
    """A copy of an API-form prompt with the standard pack's nodes replaced by this pack's, and what could not
    be converted. ``object_info`` (optional here) lets it flag values outside this pack's lists and ranges and
    inputs this pack's nodes lack."""
    out = copy.deepcopy(dict(prompt))
    report = Report()
    for node_id, node in out.items():
        kind = node.get("class_type")
        where = f"node {node_id} ({kind})"
        mapping = _mapping_for(kind, where, report)
        if mapping is None:
            continue
        inputs: dict[str, Any] = {}
        for name, value in node.get("inputs", {}).items():
            if isinstance(value, list):  # a link keeps its source
                ours = _input_name(mapping, where, name, object_info, report)
                if ours is not None:
                    inputs[ours] = value
                continue
            translated = _translate(mapping, where, name, value, object_info, report)
            if translated is not None:
                inputs[translated[0]] = translated[1]
        for name, value in mapping.added.items():
            inputs.setdefault(name, value)
        _api_wire_pipeline(prompt, node, mapping, inputs, where, report)
        node["class_type"] = mapping.target
        node["inputs"] = inputs
        report.converted.append(f"{where} -> {mapping.target}")
    _api_drop_lost_outputs(prompt, out, object_info, report)
    return out, report


def _api_wire_pipeline(prompt: Mapping[str, dict], node: Mapping, mapping: NodeMapping, inputs: dict, where: str,
                       report: Report) -> None:
    source = _api_source(prompt, node.get("inputs", {}).get("ipadapter"))
    loader = source[0] if source is not None else None
    slots = PIPELINE_OUTPUTS.get(prompt[loader].get("class_type"), {}) if loader is not None else {}
    for name, required in mapping.from_pipeline.items():
        if name in inputs:
            continue
        if name in slots:
            inputs[name] = [loader, slots[name]]
        elif required:
            report.problems.append(_pipeline_problem(where, name))


def _api_drop_lost_outputs(prompt: Mapping[str, dict], out: dict, object_info: Optional[Mapping],
                           report: Report) -> None:
    """Links from standard outputs this pack's node lacks are removed from the nodes they fed, said so."""
    for node_id, node in out.items():
        for name, value in list(node.get("inputs", {}).items()):
            source = _api_source(prompt, value)
            mapping = MAPPINGS.get(prompt[source[0]].get("class_type")) if source is not None else None
            lost = _lost_output_name(mapping, source[1], object_info) if mapping is not None else None
            if lost is not None:
                del node["inputs"][name]
                report.problems.append(f"node {source[0]} ({prompt[source[0]]['class_type']}): its {lost} output "
                                       f"has no equivalent; the link into node {node_id} ({node.get('class_type')}) "
                                       f"input {name} was removed")


# --- UI form ----------------------------------------------------------------------------------------------

def _our_sockets_and_widgets(info: Mapping) -> tuple[list[tuple[str, str, bool]], list[str]]:
    """([(name, type, optional)] of socket inputs, [widget input names]) in the node's input order."""
    order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
    sockets, widgets = [], []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            kind = spec[0]
            if isinstance(kind, list) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"):
                widgets.append(name)
            else:
                sockets.append((name, kind, section == "optional"))
    return sockets, widgets


def _standard_widget_values(kind: str, node: Mapping, where: str, report: Report) -> dict[str, Any]:
    names = [name for name, socket in STANDARD_INPUTS[kind] if socket == WIDGET]
    values = list(node.get("widgets_values") or [])
    if len(values) != len(names):
        report.problems.append(f"{where}: {len(values)} widget values where the standard node has {len(names)} "
                               f"({', '.join(names)}); check them by hand")
    return dict(zip(names, values))


def convert_ui(workflow: Mapping, object_info: Mapping[str, dict]) -> tuple[dict, Report]:
    """A copy of a UI-form workflow with the standard pack's nodes replaced by this pack's (``object_info``: this
    pack's node definitions, from a server's /object_info), and what could not be converted."""
    out = copy.deepcopy(dict(workflow))
    report = Report()
    graph = _UiGraph(out, {n["id"]: n for n in out["nodes"]}, {link[0]: link for link in out["links"]},
                     {n["id"]: n["type"] for n in out["nodes"]})
    for link in out["links"]:
        link[5] = TYPE_RENAMES.get(link[5], link[5])
    for node in out["nodes"]:
        kind = node["type"]
        where = f"node {node['id']} ({kind})"
        mapping = _mapping_for(kind, where, report)
        if mapping is None:
            for slot in (node.get("inputs") or []) + (node.get("outputs") or []):
                slot["type"] = TYPE_RENAMES.get(slot.get("type"), slot.get("type"))
            continue
        info = object_info.get(mapping.target)
        if info is None:
            report.problems.append(f"{where}: this pack's {mapping.target} is not in the node definitions given "
                                   "(an older version of the pack?); left as it is")
            continue
        _convert_ui_node(node, kind, mapping, info, object_info, graph, report)
    return out, report


@dataclass
class _UiGraph:
    out: dict  # the workflow being converted
    nodes: dict  # id -> node
    links: dict  # id -> link [id, origin, origin slot, target, target slot, type]
    original_kinds: dict  # id -> the node's type before conversion


def _convert_ui_node(node: dict, kind: str, mapping: NodeMapping, info: Mapping, object_info: Mapping,
                     graph: _UiGraph, report: Report) -> None:
    where = f"node {node['id']} ({kind})"
    sockets, widget_names = _our_sockets_and_widgets(info)
    incoming = _ui_incoming(node, mapping, object_info, graph, where, report)
    values: dict[str, Any] = {}
    for name, value in _standard_widget_values(kind, node, where, report).items():
        translated = _translate(mapping, where, name, value, object_info, report)
        if translated is not None:
            values[translated[0]] = translated[1]
    for name, value in mapping.added.items():
        values.setdefault(name, value)
    _ui_wire_pipeline(node, mapping, info, incoming, graph, where, report)
    new_inputs = []
    for name, socket_type, optional in sockets:
        slot = {"name": name, "type": socket_type, "link": incoming.pop(name, None)}
        if slot["link"] is None and not optional and name not in mapping.from_pipeline:
            report.problems.append(f"{where}: required input {name} is not connected")
        new_inputs.append(slot)
    for name, link_id in incoming.items():  # a widget turned into a socket in the standard node
        new_inputs.append({"name": name, "type": graph.links[link_id][5], "link": link_id, "widget": {"name": name}})
    for index, slot in enumerate(new_inputs):
        if slot["link"] is not None:
            graph.links[slot["link"]][3:5] = [node["id"], index]
    node["inputs"] = new_inputs
    required = info.get("input_order", {}).get("required") or list(info["input"].get("required", {}))
    missing = [n for n in widget_names if n not in values and n in required]  # optional ones: our default
    if missing:
        report.problems.append(f"{where}: no value for {', '.join(missing)}; this pack's default is used")
    node["widgets_values"] = [values.get(n, _default(info, n)) for n in widget_names]
    _convert_ui_outputs(node, info, graph, where, report)
    node["type"] = mapping.target
    node.setdefault("properties", {})["Node name for S&R"] = mapping.target
    report.converted.append(f"{where} -> {mapping.target}")


def _ui_incoming(node: Mapping, mapping: NodeMapping, object_info: Mapping, graph: _UiGraph, where: str,
                 report: Report) -> dict[str, int]:
    """The links into the standard node by our input name; links into dropped inputs are removed."""
    incoming: dict[str, int] = {}
    for slot in node.get("inputs") or []:
        if slot.get("link") is None:
            continue
        ours = _input_name(mapping, where, slot["name"], object_info, report)
        if ours is None:
            _remove_link(graph, slot["link"])
        else:
            incoming[ours] = slot["link"]
    return incoming


def _ui_wire_pipeline(node: Mapping, mapping: NodeMapping, info: Mapping, incoming: dict, graph: _UiGraph,
                      where: str, report: Report) -> None:
    loader = _ui_pipeline_loader(node, graph)
    slots = PIPELINE_OUTPUTS[graph.original_kinds[loader]] if loader is not None else {}
    for name, required in mapping.from_pipeline.items():
        if name in incoming:
            continue
        if name in slots:
            socket_type = _input_spec({mapping.target: info}, mapping.target, name)[0]
            incoming[name] = _add_link(graph, loader, slots[name], node["id"], socket_type)
        elif required:
            report.problems.append(_pipeline_problem(where, name))


def _default(info: Mapping, name: str) -> Any:
    spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}[name]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    choices = spec[0] if isinstance(spec[0], list) else options.get("options")
    return choices[0] if choices else None


def _convert_ui_outputs(node: dict, info: Mapping, graph: _UiGraph, where: str, report: Report) -> None:
    old = node.get("outputs") or []
    names = info.get("output_name") or info["output"]
    for lost in old[len(info["output"]):]:  # standard outputs this pack's node lacks
        for link_id in list(lost.get("links") or []):
            target = graph.links[link_id][3]
            report.problems.append(f"{where}: its {lost.get('name')} output has no equivalent; the link into "
                                   f"node {target} ({graph.original_kinds.get(target)}) was removed")
            _remove_link(graph, link_id)
    node["outputs"] = [{"name": names[i], "type": kind,
                        "links": list(old[i].get("links") or []) if i < len(old) else [], "slot_index": i}
                       for i, kind in enumerate(info["output"])]


def _ui_pipeline_loader(node: Mapping, graph: _UiGraph) -> Optional[int]:
    """The standard unified loader (of PIPELINE_OUTPUTS) the node's ipadapter comes from, through Reroutes."""
    slot = next((s for s in node.get("inputs") or [] if s["name"] == "ipadapter"), None)
    link_id = slot.get("link") if slot else None
    while link_id is not None:
        origin = graph.links[link_id][1]
        if graph.original_kinds[origin] in PIPELINE_OUTPUTS:
            return origin
        if graph.original_kinds[origin] not in PASS_THROUGH:
            return None
        link_id = (graph.nodes[origin].get("inputs") or [{}])[0].get("link")
    return None


def _add_link(graph: _UiGraph, origin: int, origin_slot: int, target: int, kind: str) -> int:
    link_id = max([graph.out.get("last_link_id", 0), *graph.links]) + 1
    link = [link_id, origin, origin_slot, target, -1, kind]  # target slot set once the inputs are laid out
    graph.out["links"].append(link)
    graph.links[link_id] = link
    graph.out["last_link_id"] = link_id
    outputs = graph.nodes[origin].setdefault("outputs", [])
    while len(outputs) <= origin_slot:  # named and typed for real when the loader itself is converted
        outputs.append({"name": kind.lower(), "type": kind, "links": []})
    outputs[origin_slot]["links"] = list(outputs[origin_slot].get("links") or []) + [link_id]
    return link_id


def _remove_link(graph: _UiGraph, link_id: int) -> None:
    """The link gone from the workflow and from both of its ends."""
    link = graph.links.pop(link_id)
    graph.out["links"] = [entry for entry in graph.out["links"] if entry[0] != link_id]
    origin_outputs = graph.nodes[link[1]].get("outputs") or []
    if link[2] < len(origin_outputs):
        origin_outputs[link[2]]["links"] = [i for i in origin_outputs[link[2]].get("links") or [] if i != link_id]
    for slot in graph.nodes[link[3]].get("inputs") or []:
        if slot.get("link") == link_id:
            slot["link"] = None


def convert(data: Mapping, object_info: Optional[Mapping] = None) -> tuple[dict, Report]:
    """Either form; the UI form needs ``object_info``."""
    if is_ui_workflow(data):
        if object_info is None:
            raise ValueError("a UI workflow needs this pack's node definitions (/object_info) to lay out widget "
                             "values and sockets")
        return convert_ui(data, object_info)
    return convert_api(data, object_info)


# --- this pack's node definitions -------------------------------------------------------------------------

OUR_NODES = tuple(sorted({m.target for m in MAPPINGS.values()}))
_INFO_KEYS = ("input", "input_order", "output", "output_name")


def pack_object_info(pack) -> dict[str, dict]:
    """This pack's node definitions as ``/object_info`` gives them, built in-process from the loaded pack (a
    module from comfy_bootstrap.load_pack), limited to what the conversion reads."""
    import asyncio

    extension = asyncio.run(pack.comfy_entrypoint())
    info = {}
    for node in asyncio.run(extension.get_node_list()):
        full = node.GET_NODE_INFO_V1()
        info[full["name"]] = {key: full[key] for key in _INFO_KEYS if key in full}
    return info
