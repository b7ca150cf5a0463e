"""Combo values checked when `/prompt` validates a workflow, for every node of the pack.

ComfyUI 0.3.64 to 0.3.75 compare a value with its list only for V1 inputs, whose type *is* the list
(`execution.validate_inputs`: `isinstance(input_type, list)`); a V3 `io.Combo.Input` has the type "COMBO", so
any value passed validation and failed only when the node ran, after everything upstream had run. The V3 hook
for this is the node's `validate_inputs` classmethod: ComfyUI calls it with the inputs its signature names
(a linked input arrives as None) and, for those inputs only, skips its own checks. So the hook here names
exactly the combo inputs of the node's schema: min/max checks of the other inputs stay ComfyUI's.

One limit of the host: when the hook returns a message, ComfyUI files it under every input the hook names,
so the message itself starts with the input that is wrong.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Any, Callable, Mapping, Optional, Sequence

from comfy_api.latest import io

_SHOWN_OPTIONS = 12


def _preview(options: Sequence[Any]) -> str:
    shown = ", ".join(repr(o) for o in options[:_SHOWN_OPTIONS])
    more = len(options) - _SHOWN_OPTIONS
    return shown + (f", ... ({len(options)} in all)" if more > 0 else "")


def combo_problem(name: str, value: Any, options: Sequence[Any], hint: str = "") -> Optional[str]:
    """Why `value` is not a valid choice for combo `name` (None when it is). `hint` says where options come from."""
    if any(value == o and type(value) is type(o) for o in options):  # no True == 1, no 1.0 == 1
        return None
    suffix = f" ({hint})" if hint else ""
    if not options:
        return f"{name}: {value!r} is not available: there is nothing to choose from{suffix}"
    expected = type(options[0]).__name__
    if not isinstance(value, type(options[0])):
        article = "an" if expected[0] in "aeiou" else "a"
        return (f"{name} must be {article} {expected}, one of {_preview(options)}{suffix}; "
                f"got {type(value).__name__} {value!r}")
    return f"{name}: {value!r} is not one of {_preview(options)}{suffix}"


def require_choice(name: str, value: Any, options: Sequence[Any], hint: str = "") -> None:
    """Raise ValueError (shown at the node) unless `value` is one of `options`; for linked combo values, which
    validation cannot see."""
    problem = combo_problem(name, value, options, hint)
    if problem is not None:
        raise ValueError(problem)


def combo_options(node: type) -> dict[str, list]:
    """{input name: options} of every single-choice combo input in `node`'s schema (evaluated now, so model-file
    lists are current)."""
    schema = node.define_schema()
    return {i.id: list(i.options or []) for i in schema.inputs
            if isinstance(i, io.Combo.Input) and not getattr(i, "multiselect", False)}


def _validate(cls, **values: Any):
    """The body of every generated hook: True, or one message per wrong combo value."""
    options = combo_options(cls)
    hints: Mapping[str, str] = getattr(cls, "COMBO_HINTS", {})
    # None: a link, unknown until run time; a list: ComfyUI's own bad_linked_input already reported it
    problems = [combo_problem(name, value, options[name], hints.get(name, ""))
                for name, value in values.items() if value is not None and not isinstance(value, list)
                and name in options]
    problems = [p for p in problems if p]
    return True if not problems else "; ".join(problems)


def _hook_for(names: tuple[str, ...]) -> Callable:
    def validate_inputs(cls, **values: Any):
        return _validate(cls, **values)

    # ComfyUI reads the inputs to pass (and to leave unchecked itself) from the signature.
    param = inspect.Parameter
    validate_inputs.__signature__ = inspect.Signature(
        [param("cls", param.POSITIONAL_OR_KEYWORD)]
        + [param(n, param.POSITIONAL_OR_KEYWORD, default=None) for n in names])
    return validate_inputs


class _ComboHook:
    """`validate_inputs` as a classmethod whose signature names the owner's combo inputs.

    A descriptor, so the schema is read when ComfyUI asks (after the pack registered its model folder), not
    when the class is created."""

    def __init__(self) -> None:
        self._names: weakref.WeakKeyDictionary[type, tuple[str, ...]] = weakref.WeakKeyDictionary()
        self._hooks: dict[tuple[str, ...], Callable] = {}

    def names(self, owner: type) -> tuple[str, ...]:
        if owner not in self._names:
            self._names[owner] = tuple(combo_options(owner)) if hasattr(owner, "define_schema") else ()
        return self._names[owner]

    def __get__(self, instance: Any, owner: type):
        names = self.names(owner)
        hook = self._hooks.setdefault(names, _hook_for(names))
        return hook.__get__(owner, type(owner))  # bound to the class, like a classmethod


class ValidatesCombos:
    """Mixin for `io.ComfyNode` subclasses, listed *before* `io.ComfyNode` in the bases (ComfyUI looks for an
    override of `validate_inputs` only in the classes before `io.ComfyNode`): `/prompt` answers 400 for a combo
    value outside its list, naming the input. Optional `COMBO_HINTS = {input: "where the options come from"}`."""

    validate_inputs = _ComboHook()
