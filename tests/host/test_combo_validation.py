"""nodes/validation.py in-process: every node's validate_inputs hook, as ComfyUI's execution.validate_inputs finds
and calls it, and the pure message logic."""
from __future__ import annotations

import asyncio
import inspect

import pytest

from harness import host_helpers as hh


@pytest.fixture(scope="module")
def node_classes(pack):
    extension = asyncio.run(pack.comfy_entrypoint())
    return asyncio.run(extension.get_node_list())


@pytest.fixture(scope="module")
def validation(pack):
    return hh.pack_module("nodes.validation")


SELECT = {"op": "auto", "mask_mode": "multiply output", "fused": False, "on_unsupported": "fall back"}


def test_every_node_has_a_hook_naming_exactly_its_combo_inputs(node_classes, validation):
    from comfy_api.internal import first_real_override

    for node in node_classes:
        assert issubclass(node, validation.ValidatesCombos), node.__name__
        hook = first_real_override(node, "validate_inputs")  # how execution.validate_inputs looks it up
        assert hook is not None, f"{node.__name__}: ValidatesCombos must come before io.ComfyNode in the bases"
        # the oracle: ComfyUI's V1 view of the inputs, where a V3 combo has the type "COMBO"
        inputs = node.INPUT_TYPES()
        combos = [name for section in ("required", "optional") for name, spec in inputs.get(section, {}).items()
                  if spec[0] == "COMBO"]
        spec = inspect.getfullargspec(hook)
        assert spec.args == ["cls", *combos] and spec.varkw is None, node.__name__


def _validate(prompt: dict, node_classes, monkeypatch) -> tuple[bool, list]:
    """ComfyUI's own validation of node "1" of `prompt`, with the pack's nodes registered."""
    import execution
    import nodes

    for node in node_classes:
        monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, node.define_schema().node_id, node)
    valid, errors, _ = asyncio.run(execution.validate_inputs("test", prompt, "1", {}))
    return valid, errors


def _select(**inputs) -> dict:
    return {"1": {"class_type": "SelectXformersAttentionOp", "inputs": {**SELECT, **inputs}}}


def test_host_validation_passes_good_values_and_names_bad_ones(node_classes, monkeypatch):
    assert _validate(_select(), node_classes, monkeypatch) == (True, [])
    valid, errors = _validate(_select(on_unsupported="crash"), node_classes, monkeypatch)
    assert not valid
    assert {e["extra_info"]["input_name"] for e in errors} == {"op", "mask_mode", "on_unsupported"}
    assert all(e["details"].endswith("on_unsupported: 'crash' is not one of 'fall back', 'error'") for e in errors)


def test_linked_combo_values_are_left_to_run_time(node_classes, monkeypatch):
    prompt = {**_select(op=["2", 0]), "2": _select()["1"]}  # linked to an ATTENTION_OP output
    valid, errors = _validate(prompt, node_classes, monkeypatch)
    assert not valid
    assert [e["type"] for e in errors] == ["return_type_mismatch"]  # ComfyUI's own check; the hook saw None


@pytest.mark.parametrize("value, options, expected", [
    ("b", ["a", "b"], None),
    ("c", ["a", "b"], "x: 'c' is not one of 'a', 'b'"),
    (1, ["a"], "x must be a str, one of 'a'; got int 1"),
    (True, [1, 2], "x: True is not one of 1, 2"),
    (1.0, [1, 2], "x must be an int, one of 1, 2; got float 1.0"),
    ("a", [], "x: 'a' is not available: there is nothing to choose from (in folder f)"),
    ("z", [f"o{i}" for i in range(20)], "x: 'z' is not one of 'o0', 'o1', 'o2', 'o3', 'o4', 'o5', 'o6', 'o7', "
                                         "'o8', 'o9', 'o10', 'o11', ... (20 in all)"),
])
def test_combo_problem_messages(validation, value, options, expected):
    hint = "in folder f" if not options else ""
    assert validation.combo_problem("x", value, options, hint) == expected


def test_require_choice_raises_the_same_message(validation):
    with pytest.raises(ValueError, match=r"^ipadapter_file must be a str, one of 'a.safetensors'; got list \[1\]$"):
        validation.require_choice("ipadapter_file", [1], ["a.safetensors"])
    validation.require_choice("ipadapter_file", "a.safetensors", ["a.safetensors"])
