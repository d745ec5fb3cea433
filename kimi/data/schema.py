"""A small JSON-Schema check for tool arguments: the subset the toolverse declarations use (an object of
properties with a type or a list of types, optional enum, required keys, no unknown keys). Shared by the
verifier and the evaluation, so "schema-valid" means one thing everywhere.
"""

from __future__ import annotations

_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: type(v) is int,
    "number": lambda v: type(v) in (int, float),
    "boolean": lambda v: type(v) is bool,
}


def check_arguments(args, parameters: dict) -> str | None:
    """None if `args` fits the declaration's `parameters` object schema, else what is wrong."""
    if not isinstance(args, dict):
        return f"arguments must be a JSON object, got {type(args).__name__}"
    props = parameters.get("properties", {})
    for key in parameters.get("required", ()):
        if key not in args:
            return f"missing required argument {key!r}"
    for key, value in args.items():
        prop = props.get(key)
        if prop is None:
            return f"unknown argument {key!r}; expected one of {sorted(props)}"
        kinds = prop.get("type", ())
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if kinds and not any(_TYPES[k](value) for k in kinds):
            return f"argument {key!r} must be {' or '.join(kinds)}, got {value!r}"
        if "enum" in prop and value not in prop["enum"]:
            return f"argument {key!r} must be one of {prop['enum']}, got {value!r}"
    return None
