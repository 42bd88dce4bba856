"""A small validator for the Kubernetes openAPIV3 subset that KServe's CRD schema uses.

jsonschema is not a dependency of the project, and a CRD schema is a
structural subset anyway: type, properties, required, items,
additionalProperties, enum, anyOf, pattern, minimum/maximum,
minLength/maxLength, minItems, x-kubernetes-int-or-string and
x-kubernetes-preserve-unknown-fields.  Unknown fields are errors, as with
``kubectl apply --validate=strict``.  ``format`` and the list/map-type
markers are not checked.
"""

from __future__ import annotations

import re
from typing import Any

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
}


def validate(value: Any, schema: dict, path: str = "") -> list[str]:
    """Every violation of ``schema`` by ``value``, as 'path: problem' lines."""
    where = path or "<root>"
    errors: list[str] = []
    if schema.get("x-kubernetes-int-or-string"):
        if not (_TYPES["integer"](value) or isinstance(value, str)):
            return [f"{where}: must be an integer or a string, got {type(value).__name__}"]
    elif "anyOf" in schema:
        if all(validate(value, alt, path) for alt in schema["anyOf"]):
            return [f"{where}: matches none of anyOf"]
    kind = schema.get("type")
    if kind is not None and not schema.get("x-kubernetes-int-or-string"):
        if not _TYPES[kind](value):
            return [f"{where}: must be {kind}, got {type(value).__name__} {value!r}"[:200]]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} is not one of {schema['enum']}")
    if isinstance(value, str):
        if "pattern" in schema and isinstance(value, str) and not re.search(schema["pattern"], value):
            errors.append(f"{where}: {value!r} does not match {schema['pattern']}")
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", float("inf")):
            errors.append(f"{where}: length {len(value)} is out of bounds")
    if _TYPES["number"](value):
        if value < schema.get("minimum", float("-inf")) or value > schema.get("maximum", float("inf")):
            errors.append(f"{where}: {value} is out of bounds")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            errors.append(f"{where}: needs at least {schema['minItems']} items")
        if "items" in schema:
            for i, item in enumerate(value):
                errors += validate(item, schema["items"], f"{path}[{i}]")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: missing required field {key!r}")
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = f"{path}.{key}" if path else key
            if key in props:
                errors += validate(item, props[key], sub)
            elif isinstance(extra, dict):
                errors += validate(item, extra, sub)
            elif extra is True or schema.get("x-kubernetes-preserve-unknown-fields"):
                continue
            elif props or extra is False:
                errors.append(f"{sub}: unknown field")
    return errors
