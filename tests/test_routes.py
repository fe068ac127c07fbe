"""The route table: every REST route and every gRPC method needs a permission, and a real server refuses
each one without credentials, and with a key that holds no grant for it. Only the health checks are open,
and they are listed here by hand, apart from the table."""

from __future__ import annotations

import http.client
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from dhow.access.actions import ACTIONS
from dhow.access.permissions import Permission
from dhow.protocols.grpc.generated import grpc_service_pb2 as pb
from dhow.protocols.grpc.service import InferenceServicer
from dhow.protocols.rest.app import RestApp
from dhow.protocols.rest.router import allowed_methods, resolve
from dhow.protocols.routes import GRPC_ACCESS, PUBLIC, ROUTES, Route
from tests.conftest import DhowProcess, make_key, start_dhow

#: the only routes and RPCs open to anyone (probes and load balancers carry no credentials): v2's health checks,
#: KServe v1's liveness (GET /) and TorchServe's health check (GET /ping)
OPEN_ROUTES = {"server_live", "server_ready", "v1_server_live", "torchserve_ping"}
OPEN_PATHS = {"/v2/health/live", "/v2/health/ready", "/", "/ping"}
OPEN_RPCS = {"ServerLive", "ServerReady"}
SERVICE = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
RPCS = [method.name for method in SERVICE.methods]
#: what the tests put in a path template's parameters
VALUES = {"model": "tabular", "version": "1", "name": "tabular", "id": "0123456789ab"}


def _concrete(template: str) -> str:
    return re.sub(r"{(\w+)}", lambda found: VALUES[found.group(1)], template)


#: every (route, path) the REST door serves: a model route twice, with and without its version
SERVED = [(route, _concrete(template)) for route in ROUTES for template in route.templates]
SERVED_TEMPLATES = [(route, template, _concrete(template)) for route in ROUTES for template in route.templates]


# -- the table ------------------------------------------------------------------------------------


def test_every_route_but_the_health_checks_needs_a_permission() -> None:
    assert PUBLIC == OPEN_ROUTES
    catalog = set(ACTIONS.values())
    for route in ROUTES:
        if route.name in OPEN_ROUTES:
            assert route.access is None and route.method == "GET" and route.path in OPEN_PATHS
        else:
            assert route.access in catalog, f"{route.method} {route.path} has no permission"


def test_every_rpc_of_the_service_has_the_access_of_its_rest_twin() -> None:
    assert set(GRPC_ACCESS) == set(RPCS), "an RPC of GRPCInferenceService without an access"
    assert {rpc for rpc, access in GRPC_ACCESS.items() if access is None} == OPEN_RPCS
    twins = {rpc: route for route in ROUTES for rpc in route.grpc}
    assert twins["ModelInfer"].name == twins["ModelStreamInfer"].name == "model_infer"
    for rpc in RPCS:
        assert callable(getattr(InferenceServicer, rpc, None)), f"InferenceServicer does not serve {rpc}"
        assert GRPC_ACCESS[rpc] is twins[rpc].access


def test_every_route_has_a_handler() -> None:
    for route in ROUTES:
        assert callable(getattr(RestApp, route.handler, None)), f"{route.name}: no RestApp.{route.handler}"


@pytest.mark.parametrize(("route", "template", "path"), SERVED_TEMPLATES, ids=[path for _, _, path in SERVED_TEMPLATES])
def test_the_router_finds_each_route_by_its_path(route: Route, template: str, path: str) -> None:
    match = resolve(path, route.method)
    assert match is not None and match.route is route
    assert match.version == ("1" if "{version}" in template else "")
    named = re.search(r"{(model|name|id)}", route.path)
    assert match.name == (VALUES[named.group(1)] if named else "")
    assert match.model == (match.name if route.names_model else "")


def test_unknown_paths_and_methods() -> None:
    for path in ("/v2/nothing", "/v2/models", "/v2/models//infer", "/v2/models/m/", "/v2/admin/keys/", "v2"):
        assert resolve(path, "GET") is None and resolve(path, "POST") is None
        assert allowed_methods(path) == [], path
    assert resolve("/v2/models/m/infer", "GET") is None and allowed_methods("/v2/models/m/infer") == ["POST"]
    assert allowed_methods("/v2/admin/deployments/fraud") == ["DELETE", "GET", "PUT"]
    assert allowed_methods("/v2/admin/keys") == ["GET", "POST"]
    # a fixed path wins over a model of the same name
    stats = resolve("/v2/models/stats", "GET")
    assert stats is not None and stats.route.name == "all_model_statistics"
    # a model may be named like a route's literal segment
    ready = resolve("/v2/models/ready/versions/2/ready", "GET")
    assert ready is not None and (ready.route.name, ready.name, ready.version) == ("model_ready", "ready", "2")


def test_a_verb_follows_the_last_parameter() -> None:
    """TensorFlow Serving's ``{model}:predict``: the verb is split off only when the whole segment matches no route,
    so a model whose name holds a colon keeps its routes."""
    cases = {
        ("/v1/models/fraud:predict", "POST"): ("v1_model_predict", "fraud", ""),
        ("/v1/models/fraud/versions/3:classify", "POST"): ("v1_model_classify", "fraud", "3"),
        ("/v1/models/team:fraud:regress", "POST"): ("v1_model_regress", "team:fraud", ""),
        ("/v1/models/team:fraud", "GET"): ("v1_model_status", "team:fraud", ""),
        ("/v2/models/team:fraud/infer", "POST"): ("model_infer", "team:fraud", ""),
        ("/v2/models/x:predict", "GET"): ("model_metadata", "x:predict", ""),
        ("/predictions/fraud/3", "POST"): ("torchserve_model_predictions", "fraud", "3"),
    }
    for (path, method), expected in cases.items():
        match = resolve(path, method)
        assert match is not None and (match.route.name, match.name, match.version) == expected, path
    for path in ("/v1/models/fraud:nothing", "/v1/models/fraud:", "/v1/models/:predict", "/v2/models/fraud:infer"):
        assert resolve(path, "POST") is None, path
    assert allowed_methods("/v1/models/fraud:predict") == ["GET", "POST"]  # also the status of a model so named
    assert allowed_methods("/predictions/fraud") == ["POST", "PUT"]


# -- against a real server ------------------------------------------------------------------------


#: model-less reads filtered to what the key may see (``access.permissions``): a scoped key may make them
SCOPED_READS = frozenset(
    {Permission.SERVER_READ, Permission.MODEL_READ, Permission.STATS_READ, Permission.DEPLOYMENT_READ}
)
SCOPED_READ_RPCS = frozenset({"ServerMetadata", "RepositoryIndex"})


@pytest.fixture(scope="module")
def guarded(demo_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DhowProcess, str]]:
    """A server with authentication on, and a key whose only grant is on a model that does not exist."""
    root = tmp_path_factory.mktemp("routes")
    key = make_key(root / "data", "nobody", ["admin:no-such-model"])
    server = start_dhow(demo_repository, root, "--auth", "on")
    yield server, key
    assert server.stop() == 0, server.log()


def _http(server: DhowProcess, method: str, path: str, key: str = "") -> tuple[int, Any]:
    connection = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        headers = {"authorization": f"Bearer {key}"} if key else {}
        connection.request(method, path, body=None if method == "GET" else b"{}", headers=headers)
        answer = connection.getresponse()
        raw = answer.read()
        return answer.status, json.loads(raw) if raw.strip() else None
    finally:
        connection.close()


@pytest.mark.parametrize(("route", "path"), SERVED, ids=[f"{route.method} {path}" for route, path in SERVED])
def test_each_rest_route_is_refused_without_credentials(
    guarded: tuple[DhowProcess, str], route: Route, path: str
) -> None:
    server, nobody = guarded
    status, answer = _http(server, route.method, path)
    if route.name in OPEN_ROUTES:
        assert status == 200, answer
        return
    assert status == 401 and "credentials" in answer["error"], (status, answer)
    # a valid key is refused too unless one of its grants gives the route's permission; a read without a
    # model whose answer is filtered to the models the key may see is allowed, and shows none of them
    status, answer = _http(server, route.method, path, nobody)
    assert route.access is not None
    if not route.names_model and route.access.permission in SCOPED_READS:
        assert status == 200 and "tabular" not in json.dumps(answer), (status, answer)
        return
    assert status == 403 and "lacks permission" in answer["error"], (status, answer)


def _rpc(server: DhowProcess, name: str, key: str) -> tuple[grpc.StatusCode, str]:
    """Call an RPC by its descriptor (a stream with one request), as a client that knows only the .proto."""
    method = SERVICE.methods_by_name[name]
    request = getattr(pb, method.input_type.name)()
    for field in ("name", "model_name"):
        if field in request.DESCRIPTOR.fields_by_name:
            setattr(request, field, "tabular")
    reply = getattr(pb, method.output_type.name)
    metadata = [("authorization", f"Bearer {key}")] if key else []
    path = f"/{SERVICE.full_name}/{name}"
    with grpc.insecure_channel(server.grpc_url) as channel:
        try:
            if method.client_streaming:
                call = channel.stream_stream(path, pb.ModelInferRequest.SerializeToString, reply.FromString)
                answers = list(call(iter([request]), metadata=metadata, timeout=20))
                # a refused request of an open stream is answered in the stream, as Triton does
                return grpc.StatusCode.OK, answers[0].error_message
            unary = channel.unary_unary(path, type(request).SerializeToString, reply.FromString)
            unary(request, metadata=metadata, timeout=20)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.mark.parametrize("rpc", RPCS)
def test_each_rpc_is_refused_without_credentials(guarded: tuple[DhowProcess, str], rpc: str) -> None:
    server, nobody = guarded
    code, details = _rpc(server, rpc, "")
    if rpc in OPEN_RPCS:
        assert code == grpc.StatusCode.OK, details
        return
    assert code == grpc.StatusCode.UNAUTHENTICATED and "credentials" in details, (code, details)
    code, details = _rpc(server, rpc, nobody)
    if rpc in SCOPED_READ_RPCS:
        assert code == grpc.StatusCode.OK, (code, details)
        return
    assert "lacks permission" in details, (code, details)
    # an open stream answers a refused request in the stream; a unary call ends with the refusal
    streaming = SERVICE.methods_by_name[rpc].client_streaming
    assert code == (grpc.StatusCode.OK if streaming else grpc.StatusCode.PERMISSION_DENIED), (code, details)
