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
STANDARD_INPUTS: dict[str, list[tuple[str, str]]] = {
    "IPAdapterAdvanced": [("model", "MODEL"), ("ipadapter", "IPADAPTER"), ("image", "IMAGE"), ("weight", WIDGET),
                          ("weight_type", WIDGET), ("combine_embeds", WIDGET), ("start_at", WIDGET),
                          ("end_at", WIDGET), ("embeds_scaling", WIDGET), *_APPLY_TAIL],
    "IPAdapter": [("model", "MODEL"), ("ipadapter", "IPADAPTER"), ("image", "IMAGE"), ("weight", WIDGET),
                  ("start_at", WIDGET), ("end_at", WIDGET), ("weight_type", WIDGET), ("attn_mask", "MASK")],
    "IPAdapterUnifiedLoader": [("model", "MODEL"), ("preset", WIDGET), ("ipadapter", "IPADAPTER")],
    "IPAdapterModelLoader": [("ipadapter_file", WIDGET)],
    "IPAdapterEncoder": [("ipadapter", "IPADAPTER"), ("image", "IMAGE"), ("weight", WIDGET), ("mask", "MASK"),
                         ("clip_vision", "CLIP_VISION")],
    "IPAdapterCombineEmbeds": [("embed1", "EMBEDS"), ("method", WIDGET), ("embed2", "EMBEDS"),
                               ("embed3", "EMBEDS"), ("embed4", "EMBEDS"), ("embed5", "EMBEDS")],
    "IPAdapterEmbeds": [("model", "MODEL"), ("ipadapter", "IPADAPTER"), ("pos_embed", "EMBEDS"), ("weight", WIDGET),
                        ("weight_type", WIDGET), ("start_at", WIDGET), ("end_at", WIDGET),
                        ("embeds_scaling", WIDGET), ("neg_embed", "EMBEDS"), ("attn_mask", "MASK"),
                        ("clip_vision", "CLIP_VISION")],
    "IPAdapterStyleComposition": [("model", "MODEL"), ("ipadapter", "IPADAPTER"), ("image_style", "IMAGE"),
                                  ("image_composition", "IMAGE"), ("weight_style", WIDGET),
                                  ("weight_composition", WIDGET), ("expand_style", WIDGET),
                                  ("combine_embeds", WIDGET), ("start_at", WIDGET), ("end_at", WIDGET),
                                  ("embeds_scaling", WIDGET), *_APPLY_TAIL],
    "PrepImageForClipVision": [("image", "IMAGE"), ("interpolation", WIDGET), ("crop_position", WIDGET),
                               ("sharpening", WIDGET)],
    "IPAdapterNoise": [("type", WIDGET), ("strength", WIDGET), ("blur", WIDGET), ("image_optional", "IMAGE")],
}

# Every other node id the standard pack registers: reported as not converted.
OTHER_STANDARD_NODES = frozenset({
    "IPAdapterUnifiedLoaderFaceID", "IPAdapterUnifiedLoaderCommunity", "IPAdapterInsightFaceLoader",
    "IPAdapterBatch", "IPAdapterFaceID", "IPAdapterFaceIDKolors", "IPAAdapterFaceIDBatch", "IPAdapterTiled",
    "IPAdapterTiledBatch", "IPAdapterEmbedsBatch", "IPAdapterStyleCompositionBatch", "IPAdapterMS",
    "IPAdapterClipVisionEnhancer", "IPAdapterClipVisionEnhancerBatch", "IPAdapterFromParams",
    "IPAdapterPreciseStyleTransfer", "IPAdapterPreciseStyleTransferBatch", "IPAdapterPreciseComposition",
    "IPAdapterPreciseCompositionBatch", "IPAdapterSaveEmbeds", "IPAdapterLoadEmbeds", "IPAdapterWeights",
    "IPAdapterWeightsFromStrategy", "IPAdapterPromptScheduleFromWeightsStrategy", "IPAdapterCombineWeights",
    "IPAdapterRegionalConditioning", "IPAdapterCombineParams",
})

# Socket types of the standard pack -> ours (link types in UI workflows).
TYPE_RENAMES = {"IPADAPTER": "XFORMERS_IPADAPTER", "EMBEDS": "XFORMERS_IPADAPTER_EMBEDS"}


@dataclass(frozen=True)
class NodeMapping:
    target: str
    renames: Mapping[str, str] = field(default_factory=dict)  # standard input -> ours (others keep their name)
    values: Mapping[str, Mapping[Any, Any]] = field(default_factory=dict)  # value translations per input
    added: Mapping[str, Any] = field(default_factory=dict)  # our inputs the standard node lacks: fixed values
    unneeded: frozenset = frozenset()  # standard inputs this pack does without (dropped, said so)
    needs_clip_vision: bool = False  # our node takes clip_vision, the standard one may get it from the loader


_APPLY_DEFAULTS = {"combine_embeds": "concat", "embeds_scaling": "V only"}
MAPPINGS: dict[str, NodeMapping] = {
    "IPAdapterAdvanced": NodeMapping("ApplyXformersIPAdapterAttention", needs_clip_vision=True),
    # the simple node's three weight types are the advanced node's linear / ease out / style transfer
    "IPAdapter": NodeMapping("ApplyXformersIPAdapterAttention", needs_clip_vision=True, added=_APPLY_DEFAULTS,
                             values={"weight_type": {"standard": "linear", "prompt is more important": "ease out",
                                                     "style transfer": "style transfer"}}),
    "IPAdapterUnifiedLoader": NodeMapping("XformersIPAdapterUnifiedLoader"),
    "IPAdapterModelLoader": NodeMapping("LoadXformersIPAdapter"),
    "IPAdapterEncoder": NodeMapping("XformersIPAdapterEncoder", needs_clip_vision=True),
    "IPAdapterCombineEmbeds": NodeMapping("XformersIPAdapterCombineEmbeds",
                                          renames={f"embed{i}": f"embeds_{i}" for i in range(1, 6)}),
    "IPAdapterEmbeds": NodeMapping("ApplyXformersIPAdapterEmbeds",
                                   renames={"pos_embed": "pos_embeds", "neg_embed": "neg_embeds"},
                                   unneeded=frozenset({"clip_vision"})),
    "IPAdapterStyleComposition": NodeMapping("ApplyXformersIPAdapterStyleComposition", needs_clip_vision=True),
    "PrepImageForClipVision": NodeMapping("XformersPrepImageForClipVision"),
    "IPAdapterNoise": NodeMapping("XformersIPAdapterNoise", renames={"image_optional": "image"}),
}
UNIFIED_LOADER = "IPAdapterUnifiedLoader"
LOADER_CLIP_VISION_SLOT = 2  # our unified loader's outputs: model, ipadapter, clip_vision
PASS_THROUGH = frozenset({"Reroute"})  # UI-only nodes that forward their one input


@dataclass
class Report:
    converted: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def text(self) -> str:
        lines = [f"converted: {c}" for c in self.converted] + [f"NOT converted: {p}" for p in self.problems]
        return "\n".join(lines) if lines else "nothing to convert: no standard-pack node found"


def is_ui_workflow(data: Mapping) -> bool:
    return isinstance(data.get("nodes"), list) and "links" in data


def _combo_options(object_info: Optional[Mapping], node: str, name: str) -> Optional[list]:
    if not object_info or node not in object_info:
        return None
    inputs = object_info[node]["input"]
    spec = {**inputs.get("required", {}), **inputs.get("optional", {})}.get(name)
    if spec is None:
        return None
    if isinstance(spec[0], list):
        return spec[0]
    if spec[0] == "COMBO" and len(spec) > 1:
        return spec[1].get("options")
    return None


def _translate(mapping: NodeMapping, where: str, name: str, value: Any, object_info: Optional[Mapping],
               report: Report) -> tuple[str, Any]:
    """(our input name, our value) for one widget value of a standard node."""
    ours = mapping.renames.get(name, name)
    table = mapping.values.get(name)
    if table is not None and value in table:
        value = table[value]
    options = _combo_options(object_info, mapping.target, ours)
    if options and value not in options:  # an empty list: a model-file list unknown here
        report.problems.append(f"{where}: {ours} = {value!r} has no equivalent in this pack (choices: "
                               f"{', '.join(map(repr, options))}); set it by hand")
    return ours, value


def _mapping_for(kind: str, where: str, report: Report) -> Optional[NodeMapping]:
    """The conversion of a node type; None (reported for the standard pack's other nodes) to leave it."""
    if kind in OTHER_STANDARD_NODES:
        report.problems.append(f"{where}: no equivalent node in this pack; left as it is")
    return MAPPINGS.get(kind)


# --- API form ---------------------------------------------------------------------------------------------

def _api_source(prompt: Mapping[str, dict], value: Any) -> Optional[tuple[str, int]]:
    if isinstance(value, list) and len(value) == 2 and str(value[0]) in prompt:
        return str(value[0]), int(value[1])
    return None


def convert_api(prompt: Mapping[str, dict], object_info: Optional[Mapping] = None) -> tuple[dict, Report]:
    """A copy of an API-form prompt with the standard pack's nodes replaced by this pack's, and what could not
    be converted. ``object_info`` (optional here) lets it flag values outside this pack's lists."""
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
            if name in mapping.unneeded:
                report.converted.append(f"{where}: {name} dropped (this pack's node does not need it)")
                continue
            if isinstance(value, list):  # a link keeps its source
                inputs[mapping.renames.get(name, name)] = value
            else:
                ours, value = _translate(mapping, where, name, value, object_info, report)
                inputs[ours] = value
        for name, value in mapping.added.items():
            inputs.setdefault(name, value)
        if mapping.needs_clip_vision and "clip_vision" not in inputs:
            loader = _api_pipeline_loader(prompt, node.get("inputs", {}).get("ipadapter"))
            if loader is not None:
                inputs["clip_vision"] = [loader, LOADER_CLIP_VISION_SLOT]
            else:
                report.problems.append(f"{where}: clip_vision is not connected and the ipadapter does not come "
                                       "from a unified loader: connect a CLIP Vision loader")
        node["class_type"] = mapping.target
        node["inputs"] = inputs
        report.converted.append(f"{where} -> {mapping.target}")
    return out, report


def _api_pipeline_loader(prompt: Mapping[str, dict], value: Any) -> Optional[str]:
    """The unified loader an ``ipadapter`` link comes from (directly), or None."""
    source = _api_source(prompt, value)
    if source is not None and prompt[source[0]].get("class_type") == UNIFIED_LOADER:
        return source[0]
    return None


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
    nodes = {n["id"]: n for n in out["nodes"]}
    links = {link[0]: link for link in out["links"]}
    original_kinds = {n["id"]: n["type"] for n in out["nodes"]}
    for link in out["links"]:
        link[5] = TYPE_RENAMES.get(link[5], link[5])
    for node in out["nodes"]:
        kind = node["type"]
        where = f"node {node['id']} ({kind})"
        mapping = _mapping_for(kind, where, report)
        if mapping is None:
            for slot in node.get("inputs") or []:
                slot["type"] = TYPE_RENAMES.get(slot.get("type"), slot.get("type"))
            for slot in node.get("outputs") or []:
                slot["type"] = TYPE_RENAMES.get(slot.get("type"), slot.get("type"))
            continue
        info = object_info.get(mapping.target)
        if info is None:
            report.problems.append(f"{where}: this pack's {mapping.target} is not in the node definitions given "
                                   "(an older version of the pack?); left as it is")
            continue
        _convert_ui_node(node, kind, mapping, info, object_info, out, nodes, links, original_kinds, report)
    return out, report


def _convert_ui_node(node: dict, kind: str, mapping: NodeMapping, info: Mapping, object_info: Mapping, out: dict,
                     nodes: Mapping, links: dict, original_kinds: Mapping, report: Report) -> None:
    where = f"node {node['id']} ({kind})"
    sockets, widget_names = _our_sockets_and_widgets(info)
    # links into the standard node, by our input name
    incoming: dict[str, int] = {}
    for slot in node.get("inputs") or []:
        if slot.get("link") is None:
            continue
        if slot["name"] in mapping.unneeded:
            _remove_link(out, nodes, links, slot["link"])
            report.converted.append(f"{where}: {slot['name']} dropped (this pack's node does not need it)")
            continue
        incoming[mapping.renames.get(slot["name"], slot["name"])] = slot["link"]
    # widget values by our name
    values: dict[str, Any] = {}
    for name, value in _standard_widget_values(kind, node, where, report).items():
        ours, value = _translate(mapping, where, name, value, object_info, report)
        values[ours] = value
    for name, value in mapping.added.items():
        values.setdefault(name, value)
    if mapping.needs_clip_vision and "clip_vision" not in incoming:
        loader = _ui_pipeline_loader(node, nodes, links, original_kinds)
        if loader is not None:
            incoming["clip_vision"] = _add_link(out, nodes, links, loader, LOADER_CLIP_VISION_SLOT, node["id"],
                                                "CLIP_VISION")
        else:
            report.problems.append(f"{where}: clip_vision is not connected and the ipadapter does not come from a "
                                   "unified loader: connect a CLIP Vision loader")
    new_inputs = []
    for name, socket_type, optional in sockets:
        slot = {"name": name, "type": socket_type, "link": incoming.pop(name, None)}
        if slot["link"] is None and not optional and name != "clip_vision":
            report.problems.append(f"{where}: required input {name} is not connected")
        new_inputs.append(slot)
    for name, link_id in incoming.items():  # a widget turned into a socket in the standard node
        new_inputs.append({"name": name, "type": links[link_id][5], "link": link_id, "widget": {"name": name}})
    for index, slot in enumerate(new_inputs):
        if slot["link"] is not None:
            links[slot["link"]][3:5] = [node["id"], index]
    node["inputs"] = new_inputs
    required = info.get("input_order", {}).get("required") or list(info["input"].get("required", {}))
    missing = [n for n in widget_names if n not in values and n in required]  # optional ones: our default
    if missing:
        report.problems.append(f"{where}: no value for {', '.join(missing)}; this pack's default is used")
    node["widgets_values"] = [values.get(n, _default(info, n)) for n in widget_names]
    _convert_ui_outputs(node, info)
    node["type"] = mapping.target
    node.setdefault("properties", {})["Node name for S&R"] = mapping.target
    report.converted.append(f"{where} -> {mapping.target}")


def _default(info: Mapping, name: str) -> Any:
    spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}[name]
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    choices = spec[0] if isinstance(spec[0], list) else options.get("options")
    return choices[0] if choices else None


def _convert_ui_outputs(node: dict, info: Mapping) -> None:
    old = node.get("outputs") or []
    names = info.get("output_name") or info["output"]
    node["outputs"] = [{"name": names[i], "type": kind,
                        "links": list(old[i].get("links") or []) if i < len(old) else [], "slot_index": i}
                       for i, kind in enumerate(info["output"])]


def _ui_pipeline_loader(node: Mapping, nodes: Mapping, links: Mapping, original_kinds: Mapping) -> Optional[int]:
    slot = next((s for s in node.get("inputs") or [] if s["name"] == "ipadapter"), None)
    link_id = slot.get("link") if slot else None
    while link_id is not None:
        origin = links[link_id][1]
        if original_kinds[origin] == UNIFIED_LOADER:
            return origin
        if original_kinds[origin] not in PASS_THROUGH:
            return None
        link_id = (nodes[origin].get("inputs") or [{}])[0].get("link")
    return None


def _add_link(out: dict, nodes: Mapping, links: dict, origin: int, origin_slot: int, target: int,
              kind: str) -> int:
    link_id = max([out.get("last_link_id", 0), *links]) + 1
    link = [link_id, origin, origin_slot, target, -1, kind]  # target slot set once the inputs are laid out
    out["links"].append(link)
    links[link_id] = link
    out["last_link_id"] = link_id
    outputs = nodes[origin].setdefault("outputs", [])
    while len(outputs) <= origin_slot:
        outputs.append({"name": kind.lower(), "type": kind, "links": []})
    outputs[origin_slot]["links"] = list(outputs[origin_slot].get("links") or []) + [link_id]
    return link_id


def _remove_link(out: dict, nodes: Mapping, links: dict, link_id: int) -> None:
    link = links.pop(link_id)
    out["links"] = [entry for entry in out["links"] if entry[0] != link_id]
    origin_outputs = nodes[link[1]].get("outputs") or []
    if link[2] < len(origin_outputs):
        origin_outputs[link[2]]["links"] = [i for i in origin_outputs[link[2]].get("links") or [] if i != link_id]


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
