"""Traffic policies: validation into one canonical form, and the choice of a version per request.

A policy is stored as the canonical dict ``normalize`` returns (defaults filled in, so what the
registry holds is what is applied). ``CompiledPolicy`` is the routing form: built once per
revision, it answers ``route`` with a few comparisons and, for A/B, one SHA-256 of the key.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from dhow.core.errors import InvalidInput
from dhow.core.spelling import did_you_mean

KINDS = ("pinned", "canary", "ab", "shadow", "bluegreen")
DEFAULT_STEPS = [5, 25, 50, 100]
DEFAULT_GUARDS: dict[str, float | int | None] = {
    "max_error_rate": 0.05,
    "max_p99_ratio": 2.0,
    # the p99 guard ignores a canary slower by less than this: a 0.5 ms vs 1.5 ms p99 is noise, not a regression
    "min_p99_slack_ms": 5.0,
    "min_requests": 50,
    # the quality guard (off: None): the canary's accuracy from feedback over the primary's must stay above this
    "min_accuracy_ratio": None,
    # labels each version needs before the quality guard judges
    "min_feedback": 20,
}
CANARY_STATES = ("progressing", "rolled_back", "promoted")
#: the header (HTTP, or gRPC metadata) that carries an A/B sticky key when the request parameter is absent:
#: hyphens, not underscores, since proxies such as nginx drop headers whose names hold an underscore
AB_KEY_HEADER = "x-dhow-ab-key"
#: how a shadow compares an output: its values (within a tolerance when floats), or its label (the argmax)
COMPARISONS = ("values", "label")
#: the tolerance of a float output that the shadow policy gives none
DEFAULT_TOLERANCE: dict[str, float] = {"rtol": 1e-3, "atol": 1e-5}

_FIELDS: dict[str, dict[str, bool]] = {
    # field -> required
    "pinned": {"version": True},
    "canary": {
        "primary": True,
        "canary": True,
        "steps": False,
        "step": False,
        "guards": False,
        "auto_promote": False,
        "step_interval_s": False,
        "state": False,
    },
    "ab": {"variants": True, "sticky_key": False},
    "shadow": {"primary": True, "shadow": True, "sample": False, "compare": False, "tolerances": False},
    "bluegreen": {"blue": True, "green": True, "active": False},
}


def normalize(data: Any, *, keep_state: bool = False) -> dict[str, Any]:
    """Check a policy and return its canonical form; raises InvalidInput naming the field.

    ``keep_state`` keeps a canary's ``state`` (the server's own edits); a user's edit restarts it.
    """
    if not isinstance(data, dict):
        raise InvalidInput(f"a policy must be a JSON object with a 'kind', got {_kind_of(data)}")
    kind = data.get("kind")
    if kind not in KINDS:
        raise InvalidInput(f"policy 'kind' must be one of {', '.join(KINDS)}, got {kind!r}")
    fields = _FIELDS[kind]
    unknown = sorted(set(data) - set(fields) - {"kind"})
    if unknown:
        raise _no_field(f"{kind} policy has", unknown[0], "its fields are", fields)
    missing = [name for name, required in fields.items() if required and name not in data]
    if missing:
        raise InvalidInput(f"{kind} policy needs the field {missing[0]!r}")
    return _NORMALIZERS[kind](data, keep_state)


def _pinned(data: dict[str, Any], keep_state: bool) -> dict[str, Any]:
    return {"kind": "pinned", "version": _version(data, "version")}


def _canary(data: dict[str, Any], keep_state: bool) -> dict[str, Any]:
    primary, canary = _version(data, "primary"), _version(data, "canary")
    if primary == canary:
        raise InvalidInput(f"canary version {canary} is the primary version; name two different versions")
    steps = data.get("steps", DEFAULT_STEPS)
    if (
        not isinstance(steps, list)
        or not steps
        or not all(_is_int(s) and 1 <= s <= 100 for s in steps)
        or any(b <= a for a, b in itertools.pairwise(steps))
    ):
        raise InvalidInput(f"canary 'steps' must be a list of ascending percentages from 1 to 100, got {steps!r}")
    step = data.get("step", 0)
    if not _is_int(step) or not 0 <= step < len(steps):
        raise InvalidInput(f"canary 'step' must be an index into steps (0 to {len(steps) - 1}), got {step!r}")
    guards = _guards(data.get("guards", {}))
    auto_promote = data.get("auto_promote", False)
    if not isinstance(auto_promote, bool):
        raise InvalidInput(f"canary 'auto_promote' must be true or false, got {auto_promote!r}")
    interval = data.get("step_interval_s", 0)
    if not _is_number(interval) or interval < 0:
        raise InvalidInput(f"canary 'step_interval_s' must be a number of seconds >= 0, got {interval!r}")
    state = data.get("state", "progressing") if keep_state else "progressing"
    if state not in CANARY_STATES:
        raise InvalidInput(f"canary 'state' must be one of {', '.join(CANARY_STATES)}, got {state!r}")
    return {
        "kind": "canary",
        "primary": primary,
        "canary": canary,
        "steps": list(steps),
        "step": step,
        "guards": guards,
        "auto_promote": auto_promote,
        "step_interval_s": interval,
        "state": state,
    }


def _guards(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise InvalidInput(f"canary 'guards' must be an object, got {_kind_of(data)}")
    unknown = sorted(set(data) - set(DEFAULT_GUARDS))
    if unknown:
        raise _no_field("canary guards have", unknown[0], "they are", DEFAULT_GUARDS)
    guards = {**DEFAULT_GUARDS, **data}
    rate, ratio, minimum = guards["max_error_rate"], guards["max_p99_ratio"], guards["min_requests"]
    if not _is_number(rate) or not 0 <= rate <= 1:
        raise InvalidInput(f"guard 'max_error_rate' must be a fraction from 0 to 1, got {rate!r}")
    if not _is_number(ratio) or ratio <= 0:
        raise InvalidInput(f"guard 'max_p99_ratio' must be a number above 0, got {ratio!r}")
    slack = guards["min_p99_slack_ms"]
    if not _is_number(slack) or slack < 0:
        raise InvalidInput(f"guard 'min_p99_slack_ms' must be a number of milliseconds >= 0, got {slack!r}")
    if not _is_int(minimum) or minimum < 1:
        raise InvalidInput(f"guard 'min_requests' must be an integer of at least 1, got {minimum!r}")
    quality, feedback = guards["min_accuracy_ratio"], guards["min_feedback"]
    if quality is not None and (not _is_number(quality) or quality <= 0):
        raise InvalidInput(
            f"guard 'min_accuracy_ratio' must be a number above 0 (e.g. 0.98: the canary keeps 98% of the primary's "
            f"accuracy) or null, got {quality!r}"
        )
    if not _is_int(feedback) or feedback < 1:
        raise InvalidInput(f"guard 'min_feedback' must be an integer of at least 1, got {feedback!r}")
    return guards


def _ab(data: dict[str, Any], keep_state: bool) -> dict[str, Any]:
    variants = data["variants"]
    if not isinstance(variants, list) or len(variants) < 2:
        raise InvalidInput("ab 'variants' must be a list of at least two {name, version, weight} objects")
    seen: set[str] = set()
    canonical = []
    for index, variant in enumerate(variants):
        where = f"ab variant {index + 1}"
        if not isinstance(variant, dict) or set(variant) != {"name", "version", "weight"}:
            raise InvalidInput(f"{where} must be an object with exactly 'name', 'version' and 'weight'")
        name, weight = variant["name"], variant["weight"]
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"{where}: 'name' must be a non-empty string")
        if name in seen:
            raise InvalidInput(f"ab variant name {name!r} is used twice; names must be unique")
        seen.add(name)
        if not _is_int(weight) or not 0 <= weight <= 100:
            raise InvalidInput(f"{where} ({name}): 'weight' must be an integer from 0 to 100, got {weight!r}")
        canonical.append({"name": name, "version": _version(variant, "version", where), "weight": weight})
    total = sum(v["weight"] for v in canonical)
    if total != 100:
        raise InvalidInput(f"ab variant weights must sum to 100, they sum to {total}")
    key = data.get("sticky_key", "user_id")
    if not isinstance(key, str) or not key:
        raise InvalidInput(f"ab 'sticky_key' must be a non-empty string, got {key!r}")
    return {"kind": "ab", "variants": canonical, "sticky_key": key}


def _shadow(data: dict[str, Any], keep_state: bool) -> dict[str, Any]:
    primary, shadow = _version(data, "primary"), _version(data, "shadow")
    if primary == shadow:
        raise InvalidInput(f"shadow version {shadow} is the primary version; a shadow must be another version")
    sample = data.get("sample", 1.0)
    if not _is_number(sample) or not 0 < sample <= 1:
        raise InvalidInput(f"shadow 'sample' must be a fraction above 0 and at most 1, got {sample!r}")
    compare, tolerances = _comparisons(data.get("compare", {})), _tolerances(data.get("tolerances", {}))
    both = sorted(name for name in tolerances if compare.get(name) == "label")
    if both:
        raise InvalidInput(
            f"shadow output {both[0]!r} is compared by label, so its tolerance would never apply; drop one of them"
        )
    policy = {"kind": "shadow", "primary": primary, "shadow": shadow, "sample": float(sample)}
    return {**policy, "compare": compare, "tolerances": tolerances}


def _comparisons(given: Any) -> dict[str, str]:
    """``compare``: output name -> ``values`` or ``label``; outputs left out compare their values."""
    example = '{"probabilities": "label"}'
    if not isinstance(given, dict) or not all(isinstance(name, str) and name for name in given):
        raise InvalidInput(f"shadow 'compare' must map output names to 'label' or 'values', e.g. {example}")
    for name, how in given.items():
        if how not in COMPARISONS:
            raise InvalidInput(
                f"shadow 'compare' of output {name!r} must be 'label' (the class with the highest score) "
                f"or 'values', got {how!r}"
            )
    return dict(given)


def _tolerances(given: Any) -> dict[str, dict[str, float]]:
    """``tolerances``: output name -> ``{rtol, atol}`` for its float values; either left out is the default's."""
    if not isinstance(given, dict) or not all(isinstance(name, str) and name for name in given):
        raise InvalidInput(f"shadow 'tolerances' must map output names to {{rtol, atol}}, got {given!r}")
    canonical = {}
    for name, tolerance in given.items():
        where = f"shadow tolerance of output {name!r}"
        if not isinstance(tolerance, dict):
            raise InvalidInput(f'{where} must be an object like {{"rtol": 0.01, "atol": 0.001}}, got {tolerance!r}')
        unknown = sorted(set(tolerance) - set(DEFAULT_TOLERANCE))
        if unknown:
            raise _no_field(f"{where} has", unknown[0], "it has", DEFAULT_TOLERANCE)
        values = {**DEFAULT_TOLERANCE, **tolerance}
        for key, value in values.items():
            if not _is_number(value) or value < 0:
                raise InvalidInput(f"{where}: '{key}' must be a number >= 0, got {value!r}")
        canonical[name] = {key: float(value) for key, value in values.items()}
    return canonical


def _bluegreen(data: dict[str, Any], keep_state: bool) -> dict[str, Any]:
    blue, green = _version(data, "blue"), _version(data, "green")
    if blue == green:
        raise InvalidInput(f"blue and green are both version {blue}; name two different versions")
    active = data.get("active", "blue")
    if active not in ("blue", "green"):
        raise InvalidInput(f"bluegreen 'active' must be 'blue' or 'green', got {active!r}")
    return {"kind": "bluegreen", "blue": blue, "green": green, "active": active}


_NORMALIZERS: dict[str, Callable[[dict[str, Any], bool], dict[str, Any]]] = {
    "pinned": _pinned,
    "canary": _canary,
    "ab": _ab,
    "shadow": _shadow,
    "bluegreen": _bluegreen,
}


def _version(data: Mapping[str, Any], name: str, where: str = "policy") -> int:
    value = data[name]
    if not _is_int(value) or value < 1:
        raise InvalidInput(f"{where}: '{name}' must be a model version (an integer of at least 1), got {value!r}")
    return int(value)


def _no_field(owner: str, name: str, listing: str, known: Collection[str]) -> InvalidInput:
    """``pinned policy has no field 'verison', did you mean version?; its fields are version``."""
    hint = did_you_mean(name, known)
    return InvalidInput(f"{owner} no field {name!r}{f', {hint}' if hint else ''}; {listing} {', '.join(known)}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _kind_of(value: object) -> str:
    return "null" if value is None else type(value).__name__


def versions_of(policy: Mapping[str, Any]) -> frozenset[int]:
    """Every version a policy routes to (or shadows, or keeps warm): these must stay loaded."""
    kind = policy["kind"]
    if kind == "pinned":
        return frozenset({policy["version"]})
    if kind in ("canary",):
        return frozenset({policy["primary"], policy["canary"]})
    if kind == "shadow":
        return frozenset({policy["primary"], policy["shadow"]})
    if kind == "bluegreen":
        return frozenset({policy["blue"], policy["green"]})
    return frozenset(v["version"] for v in policy["variants"])


def canary_weight(policy: Mapping[str, Any]) -> int:
    """The percentage of requests the canary gets now (0 once rolled back)."""
    if policy["state"] == "rolled_back":
        return 0
    if policy["state"] == "promoted":
        return 100
    return int(policy["steps"][policy["step"]])


@dataclass(frozen=True, slots=True)
class Route:
    version: int
    #: the name returned to the client in ``parameters.dhow_variant``
    variant: str


def sticky_bucket(key: str) -> int:
    """A stable bucket 0-99 for a sticky key: the same key always lands in the same bucket."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % 100


class CompiledPolicy:
    """A policy ready to route: ``route`` picks the version for one request."""

    def __init__(self, policy: Mapping[str, Any], *, rng: random.Random | None = None) -> None:
        self.policy = dict(policy)
        self.kind: str = policy["kind"]
        self._random = (rng or random.Random()).random
        self.shadow: int | None = policy["shadow"] if self.kind == "shadow" else None
        self.sample: float = float(policy.get("sample", 0.0))
        #: how the shadow's answers are compared, per output (see ``dhow.rollouts.shadow.compare_outputs``)
        self.compare: dict[str, str] = dict(policy.get("compare", {}))
        self.tolerances: dict[str, dict[str, float]] = dict(policy.get("tolerances", {}))
        self.sticky_key: str = policy.get("sticky_key", "")
        # (upper bound of the cumulative percentage, route), scanned in order
        self._table: list[tuple[int, Route]] = []
        if self.kind == "pinned":
            self._table = [(100, Route(policy["version"], "primary"))]
        elif self.kind == "shadow":
            self._table = [(100, Route(policy["primary"], "primary"))]
        elif self.kind == "bluegreen":
            active = policy["active"]
            self._table = [(100, Route(policy[active], active))]
        elif self.kind == "canary":
            weight = canary_weight(policy)
            self._table = [(weight, Route(policy["canary"], "canary")), (100, Route(policy["primary"], "primary"))]
        else:
            bound = 0
            for variant in policy["variants"]:
                bound += variant["weight"]
                self._table.append((bound, Route(variant["version"], variant["name"])))
        self.random_split = len(self._table) > 1

    def route(self, key: str | None = None) -> Route:
        """The version for one request; ``key`` (A/B only) makes the choice sticky."""
        table = self._table
        if len(table) == 1:
            return table[0][1]
        point = sticky_bucket(key) if key is not None and self.kind == "ab" else int(self._random() * 100)
        for bound, route in table:
            if point < bound:
                return route
        return table[-1][1]

    def wants_shadow(self) -> bool:
        return self.shadow is not None and (self.sample >= 1.0 or self._random() < self.sample)
