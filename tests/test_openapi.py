"""The OpenAPI document: 3.1 shape, every reference resolves, every route of the router and of
docs/rollouts.md is described, and the schemas accept what the API really sends."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dhow.protocols.rest import router
from dhow.protocols.rest.openapi import openapi_document
from dhow.protocols.routes import ROUTES
from dhow.rollouts.policy import DEFAULT_GUARDS

DOCS = Path(__file__).resolve().parents[1] / "docs" / "rollouts.md"
METHODS = ("get", "put", "post", "delete", "patch", "head", "options")
#: the admin API of docs/rollouts.md, in case the docs' table cannot be read
ADMIN = {
    ("GET", "/v2/admin/deployments"),
    ("GET", "/v2/admin/deployments/{name}"),
    ("PUT", "/v2/admin/deployments/{name}"),
    ("DELETE", "/v2/admin/deployments/{name}"),
    ("POST", "/v2/admin/deployments/{name}/promote"),
    ("POST", "/v2/admin/deployments/{name}/rollback"),
    ("POST", "/v2/admin/deployments/{name}/switch"),
    ("POST", "/v2/admin/deployments/{name}/release"),
    ("GET", "/v2/admin/deployments/{name}/history"),
    ("GET", "/v2/admin/deployments/{name}/events"),
    ("GET", "/v2/admin/openapi.json"),
}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return openapi_document()


def _operations(document: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if method in METHODS:
                yield path, method.upper(), operation


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _refs(item)


def _pointer(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref} points outside the document"
    node: Any = document
    for token in ref[2:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and token in node, f"{ref} does not resolve ({token!r} is missing)"
        node = node[token]
    return node


def _deref(document: dict[str, Any], node: Any) -> Any:
    while isinstance(node, dict) and "$ref" in node:
        node = _pointer(document, node["$ref"])
    return node


def _resolve(path: str, method: str) -> router.Match | None:
    concrete = path.replace("{model}", "fraud").replace("{version}", "2").replace("{name}", "fraud")
    return router.resolve(concrete.replace("{id}", "0123456789ab"), method)


def test_the_document_has_the_openapi_3_1_shape(document: dict[str, Any]) -> None:
    assert json.loads(json.dumps(document)) == document
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"] == "dhow" and document["info"]["version"]
    assert document["paths"] and all(path.startswith("/") for path in document["paths"])
    ids = [operation["operationId"] for _, _, operation in _operations(document)]
    assert len(ids) == len(set(ids)), "operationIds must be unique"
    for path, method, operation in _operations(document):
        assert operation["responses"], f"{method} {path} has no responses"
        assert operation["summary"], f"{method} {path} has no summary"


def test_every_reference_resolves(document: dict[str, Any]) -> None:
    refs = set(_refs(document))
    assert len(refs) > 20
    for ref in refs:
        _pointer(document, ref)
    mapping = document["components"]["schemas"]["Policy"]["discriminator"]["mapping"]
    for target in mapping.values():
        _pointer(document, target)


def test_every_path_template_declares_its_parameters(document: dict[str, Any]) -> None:
    for path, method, operation in _operations(document):
        declared = {
            parameter["name"]
            for parameter in (_deref(document, p) for p in operation.get("parameters", ()))
            if parameter["in"] == "path"
        }
        assert declared == set(re.findall(r"{(\w+)}", path)), f"{method} {path}"


def test_every_admin_route_of_the_docs_is_described(document: dict[str, Any]) -> None:
    documented = set(re.findall(r"`(GET|PUT|POST|DELETE) (/v2/admin/[^`\s]+)`", DOCS.read_text(encoding="utf-8")))
    assert documented == ADMIN
    described = {(method, path) for path, method, _ in _operations(document)}
    assert described >= ADMIN
    for method, path in ADMIN - {("GET", "/v2/admin/openapi.json")}:
        responses = document["paths"][path][method.lower()]["responses"]
        assert "404" in responses and "200" in responses, f"{method} {path}"
        if method != "GET":
            assert (
                "409" in responses and "400" in responses and "requestBody" in document["paths"][path][method.lower()]
            )


def test_every_route_of_the_router_is_described(document: dict[str, Any]) -> None:
    for path in router._FIXED:
        assert path in document["paths"], f"{path} is served but not described"
    # written out here, not read from the route table, so that a route dropped from the table shows up
    for action in ("/ready", "/config", "/stats", "/infer"):
        assert f"/v2/models/{{model}}{action}" in document["paths"]
        assert f"/v2/models/{{model}}/versions/{{version}}{action}" in document["paths"]
    assert "/v2/models/{model}" in document["paths"] and "/v2/models/{model}/versions/{version}" in document["paths"]
    for action in ("load", "unload"):
        assert f"/v2/repository/models/{{model}}/{action}" in document["paths"]
    # the peers' doors: KServe v1 / TensorFlow Serving, TorchServe
    for verb in (":predict", ":classify", ":regress", ":explain", "/metadata", ""):
        assert f"/v1/models/{{model}}{verb}" in document["paths"]
        assert f"/v1/models/{{model}}/versions/{{version}}{verb}" in document["paths"]
    assert {"/", "/ping", "/v1/models", "/predictions/{model}", "/predictions/{model}/{version}"} <= set(
        document["paths"]
    )
    assert set(document["paths"]["/predictions/{model}"]) == {"post", "put"}
    # both ways: each described operation is a real route with that method, and every route is described
    seen = set()
    for path, method, _ in _operations(document):
        match = _resolve(path, method)
        assert match is not None and match.route.method == method, f"{method} {path} is not a route"
        seen.add(match.route.name)
    assert seen == {route.name for route in ROUTES}


def test_errors_answer_the_error_schema(document: dict[str, Any]) -> None:
    error = {"$ref": "#/components/schemas/Error"}
    assert document["components"]["schemas"]["Error"] == {
        "type": "object",
        "properties": {"error": {"type": "string", "description": "What was wrong."}},
        "required": ["error"],
    }
    for path, method, operation in _operations(document):
        for status, response in operation["responses"].items():
            if status.startswith(("4", "5")):
                assert _deref(document, response)["content"]["application/json"]["schema"] == error, (
                    f"{method} {path} {status}"
                )
    infer = document["paths"]["/v2/models/{model}/infer"]["post"]
    assert {"400", "404", "429", "503", "504"} <= set(infer["responses"])
    assert "binary_data_size" in infer["description"] and "Inference-Header-Content-Length" in infer["description"]
    assert "application/octet-stream" in infer["requestBody"]["content"]


def test_the_policy_is_one_of_the_five_kinds(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    policy = schemas["Policy"]
    kinds = {}
    for option in policy["oneOf"]:
        schema = _deref(document, option)
        kinds[schema["properties"]["kind"]["const"]] = schema
        assert schema["additionalProperties"] is False
    assert set(kinds) == {"pinned", "canary", "ab", "shadow", "bluegreen"}
    assert set(policy["discriminator"]["mapping"]) == set(kinds)
    assert set(kinds["canary"]["properties"]) >= {"primary", "canary", "steps", "step", "guards", "auto_promote"}
    assert kinds["canary"]["properties"]["steps"]["default"] == [5, 25, 50, 100]
    assert set(_deref(document, kinds["canary"]["properties"]["guards"])["properties"]) == set(DEFAULT_GUARDS)
    assert kinds["ab"]["properties"]["sticky_key"]["default"] == "user_id"
    assert kinds["bluegreen"]["properties"]["active"]["enum"] == ["blue", "green"]
    assert set(schemas["Deployment"]["properties"]) == {
        "name",
        "policy",
        "revision",
        "updated_at",
        "updated_by",
        "status",
    }


def test_the_document_passes_openapi_spec_validator(document: dict[str, Any]) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    validator.validate(document)


def _validator(document: dict[str, Any], name: str) -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize(
    ("name", "instance", "valid"),
    [
        ("Policy", {"kind": "pinned", "version": 2}, True),
        ("Policy", {"kind": "canary", "primary": 1, "canary": 2, "guards": {"min_requests": 10}}, True),
        ("Policy", {"kind": "ab", "variants": [{"name": "a", "version": 1, "weight": 100}]}, True),
        ("Policy", {"kind": "shadow", "primary": 1, "shadow": 2, "sample": 0.5}, True),
        ("Policy", {"kind": "shadow", "primary": 1, "shadow": 2, "compare": {"p": "label"}}, True),
        ("Policy", {"kind": "shadow", "primary": 1, "shadow": 2, "tolerances": {"p": {"rtol": 0.1, "atol": 0}}}, True),
        ("Policy", {"kind": "shadow", "primary": 1, "shadow": 2, "compare": {"p": "argmax"}}, False),
        ("Policy", {"kind": "shadow", "primary": 1, "shadow": 2, "tolerances": {"p": {"rtl": 0.1}}}, False),
        ("Policy", {"kind": "bluegreen", "blue": 1, "green": 2, "active": "green"}, True),
        ("Policy", {"kind": "pinned", "version": 2, "colour": "red"}, False),
        ("Policy", {"kind": "canary", "primary": 1}, False),
        ("Policy", {"kind": "random"}, False),
        ("Policy", {"kind": "pinned", "version": "2"}, False),
        (
            "InferenceRequest",
            {
                "id": "first",
                "parameters": {"user_id": "u-42", "binary_data_output": True},
                "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 2], "data": [[0.1, 0.2]]}],
                "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}],
            },
            True,
        ),
        ("InferenceRequest", {"inputs": [{"name": "x", "datatype": "FLOAT", "shape": [1]}]}, False),
        (
            "Deployment",
            {
                "name": "fraud",
                "policy": {"kind": "canary", "primary": 1, "canary": 2, "state": "rolled_back", "step": 1},
                "revision": 3,
                "updated_at": "2025-01-01T00:00:00+00:00",
                "updated_by": "dhow-analysis",
                "status": {
                    "weight": 0,
                    "window": {
                        "primary": {"requests": 3, "errors": 0, "p99_ms": 1.5},
                        "canary": {"requests": 0, "errors": 0, "p99_ms": None},
                    },
                },
            },
            True,
        ),
        (
            "HistoryRow",
            {
                "name": "fraud",
                "revision": 1,
                "at": "2025-01-01T00:00:00+00:00",
                "actor": "alice",
                "action": "create",
                "reason": "",
                "before": None,
                "after": {"kind": "pinned", "version": 1},
            },
            True,
        ),
        ("PutDeploymentRequest", {"policy": {"kind": "pinned", "version": 1}, "revision": 0, "reason": "new"}, True),
        ("PutDeploymentRequest", {"policy": {"kind": "pinned", "version": 1}}, False),
        ("ActionRequest", {"reason": "looks good"}, True),
        ("Error", {"error": "deployment 'fraud' is at revision 4, not 3: read it again and retry"}, True),
    ],
)
def test_the_schemas_accept_what_the_api_sends(
    document: dict[str, Any], name: str, instance: dict[str, Any], valid: bool
) -> None:
    errors = list(_validator(document, name).iter_errors(instance))
    assert (not errors) == valid, errors
