"""The REST router, derived from ``dhow.protocols.routes``: fixed paths by one dict look-up, the others by
splitting the path and walking a tree of its segments (one dict look-up per segment).

Versions are optional on every model route: ``/v2/models/{m}[/versions/{v}][/ready|config|stats|infer]``.
A verb after the last parameter (``/v1/models/{m}:predict``) is a segment of its own in the tree (``:predict``);
a path's last segment is split at its last colon only when the path does not match as it is, so that a model
whose name holds a colon keeps its routes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from dhow.protocols.routes import ROUTES, Route

__all__ = ["Match", "allowed_methods", "resolve"]


class Match(NamedTuple):
    """A route and the values of its path's parameters (a tuple: the cheapest immutable object to make)."""

    route: Route
    #: what the path names: a model, a deployment or the id of an API key ("" for a fixed path)
    name: str = ""
    version: str = ""

    @property
    def model(self) -> str:
        """The model that admission checks scope and tenant against ("" when the path names none)."""
        return self.name if self.route.names_model else ""


@dataclass(slots=True)
class _Node:
    """A segment of the path templates: the next literal segments, or a parameter (never both)."""

    literals: dict[str, _Node] = field(default_factory=dict)
    parameter: _Node | None = None
    #: the routes that end here, by method
    routes: dict[str, Route] = field(default_factory=dict)


def _build(routes: tuple[Route, ...]) -> tuple[dict[str, dict[str, Match]], _Node]:
    fixed: dict[str, dict[str, Match]] = {}
    tree = _Node()
    for route in routes:
        for template in route.templates:
            if "{" not in template:
                fixed.setdefault(template, {})[route.method] = Match(route)
            else:
                _add(tree, template, route)
    return fixed, tree


def _add(node: _Node, template: str, route: Route) -> None:
    parts = template.replace("}:", "}/:").split("/")  # a verb after a parameter is a segment of its own
    parameters = [part[1:-1] for part in parts if part.startswith("{")]
    if len(parameters) > 2 or parameters[1:] not in ([], ["version"]):
        raise ValueError(f"{template}: a route names one thing, then optionally its {{version}}")
    for part in parts[1:]:
        if part.startswith("{"):
            if node.literals:
                raise ValueError(f"{template}: {part} is ambiguous with the literal segments {sorted(node.literals)}")
            node.parameter = node.parameter or _Node()
            node = node.parameter
        else:
            if node.parameter is not None:
                raise ValueError(f"{template}: '{part}' is ambiguous with a parameter at the same place")
            node = node.literals.setdefault(part, _Node())
    node.routes[route.method] = route


_FIXED, _TREE = _build(ROUTES)


def _walk(parts: list[str]) -> tuple[_Node, list[str]] | None:
    """The node a path's segments end at, with the values of its parameters; None for an unknown path."""
    if parts[0]:  # a path starts with "/"
        return None
    node, values = _TREE, []
    for part in parts[1:]:
        child = node.literals.get(part)
        if child is None:
            child = node.parameter
            if child is None or not part:
                return None
            values.append(part)
        node = child
    return node, values


def resolve(path: str, method: str) -> Match | None:
    """The route that answers ``method`` on ``path``, with its parameters; None if none does
    (``allowed_methods`` then tells an unknown path, 404, from a known one, 405)."""
    fixed = _FIXED.get(path)
    if fixed is not None:
        return fixed.get(method)
    parts = path.split("/")
    found = _walk(parts)
    if found is not None:
        route = found[0].routes.get(method)
        if route is not None:
            return Match(route, *found[1])
    verbed = _split_verb(parts)
    if verbed is None:
        return None
    found = _walk(verbed)
    if found is None:
        return None
    route = found[0].routes.get(method)
    return Match(route, *found[1]) if route is not None else None


def _split_verb(parts: list[str]) -> list[str] | None:
    """The segments with the last one's verb apart (``m:predict`` -> ``m``, ``:predict``); None without one."""
    head, colon, verb = parts[-1].rpartition(":")
    if not colon or not head or not verb:
        return None
    return [*parts[:-1], head, colon + verb]


def allowed_methods(path: str) -> list[str]:
    """The methods a path answers (for a 405's Allow header); empty for an unknown path."""
    fixed = _FIXED.get(path)
    if fixed is not None:
        return sorted(fixed)
    parts = path.split("/")
    methods: set[str] = set()
    for candidate in (parts, _split_verb(parts)):
        found = _walk(candidate) if candidate is not None else None
        if found is not None:
            methods.update(found[0].routes)
    return sorted(methods)
