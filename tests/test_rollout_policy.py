"""Traffic policies: validation with clear refusals, routing splits, stickiness and canary verdicts."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import numpy as np
import pytest

from dhow.core.errors import InvalidInput
from dhow.core.types import Tensor
from dhow.rollouts.analysis import judge
from dhow.rollouts.editor import after_action
from dhow.rollouts.policy import CompiledPolicy, canary_weight, normalize, sticky_bucket, versions_of
from dhow.rollouts.routing import Active, Window
from dhow.rollouts.shadow import compare_outputs
from dhow.rollouts.store import Deployment


def test_defaults_are_filled_in() -> None:
    canary = normalize({"kind": "canary", "primary": 1, "canary": 2})
    assert canary["steps"] == [5, 25, 50, 100] and canary["step"] == 0 and canary["state"] == "progressing"
    assert canary["guards"] == {
        "max_error_rate": 0.05,
        "max_p99_ratio": 2.0,
        "min_p99_slack_ms": 5.0,
        "min_requests": 50,
        "min_accuracy_ratio": None,
        "min_feedback": 20,
    }
    assert normalize({"kind": "shadow", "primary": 1, "shadow": 2})["sample"] == 1.0
    assert normalize({"kind": "bluegreen", "blue": 1, "green": 2})["active"] == "blue"
    ab = normalize({"kind": "ab", "variants": [_variant("a", 1, 50), _variant("b", 2, 50)]})
    assert ab["sticky_key"] == "user_id"


def test_a_users_edit_restarts_a_canary() -> None:
    edited = normalize({"kind": "canary", "primary": 1, "canary": 2, "state": "rolled_back"})
    assert edited["state"] == "progressing"
    assert normalize({**edited, "state": "rolled_back"}, keep_state=True)["state"] == "rolled_back"


def _variant(name: str, version: int, weight: int) -> dict[str, Any]:
    return {"name": name, "version": version, "weight": weight}


@pytest.mark.parametrize(
    ("policy", "fragment"),
    [
        ([], "must be a JSON object"),
        ({"kind": "rainbow"}, "must be one of pinned, canary, ab, shadow, bluegreen"),
        ({"kind": "pinned"}, "needs the field 'version'"),
        ({"kind": "pinned", "version": 1, "colour": "red"}, "no field 'colour'; its fields are version"),
        ({"kind": "shadow", "primary": 1, "shadow": 2, "sampel": 0.5}, "no field 'sampel', did you mean sample?"),
        ({"kind": "shadow", "primary": 1, "shadow": 2, "compare": {"p": "argmax"}}, "must be 'label' (the class"),
        ({"kind": "shadow", "primary": 1, "shadow": 2, "compare": ["p"]}, "'compare' must map output names"),
        ({"kind": "shadow", "primary": 1, "shadow": 2, "tolerances": {"p": 0.1}}, 'an object like {"rtol": 0.01'),
        ({"kind": "shadow", "primary": 1, "shadow": 2, "tolerances": {"p": {"rtol": -1}}}, "'rtol' must be a number"),
        ({"kind": "shadow", "primary": 1, "shadow": 2, "tolerances": {"p": {"rtl": 1}}}, "did you mean rtol?"),
        (
            {"kind": "shadow", "primary": 1, "shadow": 2, "compare": {"p": "label"}, "tolerances": {"p": {"atol": 1}}},
            "output 'p' is compared by label, so its tolerance would never apply",
        ),
        ({"kind": "canary", "primary": 1, "canary": 2, "guards": {"max_error": 0.1}}, "did you mean max_error_rate?"),
        ({"kind": "pinned", "version": "1"}, "'version' must be a model version"),
        ({"kind": "pinned", "version": True}, "'version' must be a model version"),
        ({"kind": "ab", "variants": [_variant("a", 1, 60), _variant("b", 2, 50)]}, "must sum to 100, they sum to 110"),
        ({"kind": "ab", "variants": [_variant("a", 1, 50), _variant("a", 2, 50)]}, "'a' is used twice"),
        ({"kind": "ab", "variants": [_variant("a", 1, 100)]}, "at least two"),
        ({"kind": "ab", "variants": [_variant("a", 1, 150), _variant("b", 2, -50)]}, "from 0 to 100"),
        ({"kind": "ab", "variants": [{"name": "a", "version": 1}, _variant("b", 2, 50)]}, "exactly 'name'"),
        ({"kind": "shadow", "primary": 2, "shadow": 2}, "shadow version 2 is the primary"),
        ({"kind": "shadow", "primary": 1, "shadow": 2, "sample": 0}, "'sample' must be a fraction"),
        ({"kind": "canary", "primary": 1, "canary": 1}, "canary version 1 is the primary"),
        ({"kind": "canary", "primary": 1, "canary": 2, "steps": [50, 25]}, "ascending percentages"),
        ({"kind": "canary", "primary": 1, "canary": 2, "steps": [5, 150]}, "ascending percentages"),
        ({"kind": "canary", "primary": 1, "canary": 2, "step": 4}, "index into steps (0 to 3)"),
        ({"kind": "canary", "primary": 1, "canary": 2, "guards": {"max_errors": 1}}, "no field 'max_errors'"),
        ({"kind": "canary", "primary": 1, "canary": 2, "guards": {"max_error_rate": 2}}, "fraction from 0 to 1"),
        ({"kind": "canary", "primary": 1, "canary": 2, "guards": {"min_requests": 0}}, "at least 1"),
        ({"kind": "canary", "primary": 1, "canary": 2, "auto_promote": "yes"}, "true or false"),
        ({"kind": "bluegreen", "blue": 3, "green": 3}, "both version 3"),
        ({"kind": "bluegreen", "blue": 1, "green": 3, "active": "red"}, "'blue' or 'green'"),
    ],
)
def test_bad_policies_are_refused_naming_what_to_fix(policy: Any, fragment: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        normalize(policy)
    assert fragment in caught.value.message


def test_versions_each_policy_keeps_loaded() -> None:
    assert versions_of(normalize({"kind": "pinned", "version": 3})) == {3}
    assert versions_of(normalize({"kind": "shadow", "primary": 1, "shadow": 2})) == {1, 2}
    assert versions_of(normalize({"kind": "bluegreen", "blue": 1, "green": 2, "active": "green"})) == {1, 2}
    ab = normalize({"kind": "ab", "variants": [_variant("a", 1, 20), _variant("b", 2, 30), _variant("c", 4, 50)]})
    assert versions_of(ab) == {1, 2, 4}


def test_canary_split_follows_the_weight() -> None:
    policy = normalize({"kind": "canary", "primary": 1, "canary": 2, "steps": [10, 100]})
    compiled = CompiledPolicy(policy, rng=random.Random(7))
    counts = Counter(compiled.route().version for _ in range(20_000))
    # binomial(20000, 0.1): sd = 42; 5 sd either side
    assert abs(counts[2] - 2_000) < 5 * 42
    assert CompiledPolicy({**policy, "state": "rolled_back"}).route().version == 1
    assert CompiledPolicy({**policy, "state": "promoted"}).route().version == 2


def test_ab_is_sticky_per_key_and_split_by_weight() -> None:
    policy = normalize({"kind": "ab", "variants": [_variant("a", 1, 30), _variant("b", 2, 70)]})
    compiled = CompiledPolicy(policy)
    first = {f"user-{i}": compiled.route(f"user-{i}") for i in range(2_000)}
    again = {key: compiled.route(key) for key in first}
    assert first == again
    share = sum(route.variant == "a" for route in first.values()) / len(first)
    assert abs(share - 0.30) < 0.05
    assert all(0 <= sticky_bucket(key) < 100 for key in first)


def test_pinned_and_bluegreen_send_everything_to_one_version() -> None:
    assert {CompiledPolicy({"kind": "pinned", "version": 4}).route().version for _ in range(50)} == {4}
    green = CompiledPolicy(normalize({"kind": "bluegreen", "blue": 1, "green": 2, "active": "green"}))
    assert {(r.version, r.variant) for r in (green.route() for _ in range(50))} == {(2, "green")}


def test_actions_move_a_canary_and_switch_blue_green() -> None:
    canary = normalize({"kind": "canary", "primary": 1, "canary": 2, "steps": [10, 50, 100]})
    step1 = after_action(canary, "promote")
    assert canary_weight(step1) == 50
    done = after_action(after_action(step1, "promote"), "promote")
    assert done["state"] == "promoted" and canary_weight(done) == 100
    back = after_action(step1, "rollback")
    assert back["state"] == "rolled_back" and canary_weight(back) == 0
    with pytest.raises(InvalidInput, match="rolled back; set a new policy"):
        after_action(back, "promote")
    blue = normalize({"kind": "bluegreen", "blue": 1, "green": 2})
    assert after_action(blue, "switch")["active"] == "green"
    assert after_action(after_action(blue, "switch"), "release") == {"kind": "pinned", "version": 2}
    with pytest.raises(InvalidInput, match="applies to canary deployments; this one is bluegreen"):
        after_action(blue, "promote")


def _active(guards: dict[str, Any], canary: Window, primary: Window) -> Active:
    policy = normalize({"kind": "canary", "primary": 1, "canary": 2, "guards": guards})
    active = Active(Deployment("m", policy, 1, "now", "me"), CompiledPolicy(policy))
    active.windows = {"canary": canary, "primary": primary}
    return active


def _window(requests: int, errors: int, latency_ms: float) -> Window:
    window = Window(requests=requests, errors=errors)
    window.latencies.extend([latency_ms] * requests)
    return window


def test_canary_verdicts() -> None:
    guards = {"min_requests": 20, "max_error_rate": 0.1, "max_p99_ratio": 2.0}
    assert judge(_active(guards, _window(19, 19, 5), _window(100, 0, 5))) is None  # too few to judge
    verdict = judge(_active(guards, _window(40, 10, 5), _window(100, 0, 5)))
    assert verdict is not None and verdict[0] == "rollback" and verdict[2]["guard"] == "max_error_rate"
    verdict = judge(_active(guards, _window(40, 0, 50), _window(100, 0, 5)))
    assert verdict is not None and verdict[0] == "rollback" and verdict[2]["guard"] == "max_p99_ratio"
    assert "10.00x" in verdict[1]
    verdict = judge(_active(guards, _window(40, 1, 6), _window(100, 0, 5)))
    assert verdict is not None and verdict[0] == "promote"
    # 3x slower but by 2 ms only: within the default 5 ms slack, not a regression
    verdict = judge(_active(guards, _window(40, 0, 3), _window(100, 0, 1)))
    assert verdict is not None and verdict[0] == "promote"
    verdict = judge(_active({**guards, "min_p99_slack_ms": 1}, _window(40, 0, 3), _window(100, 0, 1)))
    assert verdict is not None and verdict[0] == "rollback"


def test_shadow_comparison() -> None:
    def tensors(probabilities: list[float], label: int) -> list[Tensor]:
        return [
            Tensor("probabilities", "FP32", [1, 2], np.array([probabilities], dtype=np.float32)),
            Tensor("label", "INT64", [1], np.array([label])),
        ]

    assert compare_outputs(tensors([0.2, 0.8], 1), tensors([0.2, 0.8], 1)) == (True, 0.0)
    agree, difference = compare_outputs(tensors([0.2, 0.8], 1), tensors([0.3, 0.7], 1))
    assert not agree and difference == pytest.approx(0.1)
    assert not compare_outputs(tensors([0.2, 0.8], 1), tensors([0.2, 0.8], 0))[0]


def test_shadow_policies_keep_per_output_comparisons_and_tolerances() -> None:
    assert normalize({"kind": "shadow", "primary": 1, "shadow": 2}) == {
        "kind": "shadow", "primary": 1, "shadow": 2, "sample": 1.0, "compare": {}, "tolerances": {},
    }  # fmt: skip
    given = {"compare": {"probabilities": "label"}, "tolerances": {"scores": {"atol": 0.5}}}
    policy = normalize({"kind": "shadow", "primary": 1, "shadow": 2, **given})
    assert policy["compare"] == {"probabilities": "label"}
    assert policy["tolerances"] == {"scores": {"rtol": 1e-3, "atol": 0.5}}  # the default fills what is left out
    compiled = CompiledPolicy(policy)
    assert (compiled.compare, compiled.tolerances) == (policy["compare"], policy["tolerances"])


def test_shadow_compares_a_classifiers_labels_and_each_outputs_tolerance() -> None:
    def probabilities(*rows: list[float]) -> list[Tensor]:
        return [Tensor("probabilities", "FP32", [len(rows), 2], np.array(rows, dtype=np.float32))]

    primary = probabilities([0.2, 0.8], [0.9, 0.1])
    retrained = probabilities([0.3, 0.7], [0.6, 0.4])  # other probabilities, the same classes
    assert not compare_outputs(primary, retrained)[0]
    by_label = {"probabilities": "label"}
    agree, difference = compare_outputs(primary, retrained, by_label)
    assert agree and difference == pytest.approx(0.2)  # the difference is still reported
    assert not compare_outputs(primary, probabilities([0.2, 0.8], [0.4, 0.6]), by_label)[0]  # a class changed
    # per-output tolerances: wide enough agrees, the default does not, other outputs keep the default
    assert compare_outputs(primary, retrained, tolerances={"probabilities": {"rtol": 0.0, "atol": 0.31}})[0]
    assert not compare_outputs(primary, retrained, tolerances={"probabilities": {"rtol": 0.0, "atol": 0.29}})[0]
    assert not compare_outputs(primary, retrained, tolerances={"other": {"rtol": 1.0, "atol": 1.0}})[0]
    # a one-dimensional output is its own labels
    labels = [Tensor("label", "INT64", [2], np.array([1, 0]))]
    assert compare_outputs(labels, labels, {"label": "label"})[0]
    assert not compare_outputs(labels, [Tensor("label", "INT64", [2], np.array([1, 1]))], {"label": "label"})[0]
