"""Small constructors of JSON Schema (2020-12, as OpenAPI 3.1 uses it), so that the schemas read as shapes."""

from __future__ import annotations

from typing import Any

__all__ = ["Schema", "array", "integer", "json_content", "number", "obj", "ref", "string"]

Schema = dict[str, Any]


def ref(name: str, kind: str = "schemas") -> Schema:
    return {"$ref": f"#/components/{kind}/{name}"}


def obj(properties: dict[str, Schema], required: tuple[str, ...] = (), **extra: Any) -> Schema:
    schema: Schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    schema.update(extra)
    return schema


def array(items: Schema, **extra: Any) -> Schema:
    return {"type": "array", "items": items, **extra}


def _typed(kind: str, description: str, extra: dict[str, Any]) -> Schema:
    schema: Schema = {"type": kind, **extra}
    if description:
        schema["description"] = description
    return schema


def string(description: str = "", **extra: Any) -> Schema:
    return _typed("string", description, extra)


def integer(description: str = "", **extra: Any) -> Schema:
    return _typed("integer", description, extra)


def number(description: str = "", **extra: Any) -> Schema:
    return _typed("number", description, extra)


def json_content(schema: Schema) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}
