"""The component schemas of deployments (docs/rollouts.md): traffic policies, their status, edits, history."""

from __future__ import annotations

from dhow.protocols.rest.openapi.schema import Schema, array, integer, number, obj, ref, string

__all__ = ["deployment_schemas"]

#: policy kind -> the name of its schema
_POLICY_KINDS = {
    "pinned": "PinnedPolicy",
    "canary": "CanaryPolicy",
    "ab": "ABPolicy",
    "shadow": "ShadowPolicy",
    "bluegreen": "BlueGreenPolicy",
}


def deployment_schemas() -> dict[str, Schema]:
    return {**_policy_schemas(), **_deployment_schemas()}


def _version_schema(description: str) -> Schema:
    return integer(description, minimum=1)


def _policy_schemas() -> dict[str, Schema]:
    """A traffic policy is one of five kinds, told apart by its ``kind``."""

    def policy(kind: str, description: str, properties: dict[str, Schema], required: tuple[str, ...]) -> Schema:
        return obj(
            {"kind": {"const": kind}, **properties},
            ("kind", *required),
            additionalProperties=False,
            description=description,
        )

    return {
        "Policy": {
            "description": "A traffic policy: which versions of the model answer its name.",
            "oneOf": [ref(schema) for schema in _POLICY_KINDS.values()],
            "discriminator": {
                "propertyName": "kind",
                "mapping": {kind: ref(schema)["$ref"] for kind, schema in _POLICY_KINDS.items()},
            },
        },
        "PinnedPolicy": policy(
            "pinned",
            "All traffic to one version.",
            {"version": _version_schema("The version that answers.")},
            ("version",),
        ),
        "CanaryPolicy": policy(
            "canary",
            "steps[step] percent of requests go to canary, the rest to primary.",
            {
                "primary": _version_schema("The current version."),
                "canary": _version_schema("The new version (not the primary)."),
                "steps": array(
                    integer(minimum=1, maximum=100),
                    minItems=1,
                    default=[5, 25, 50, 100],
                    description="Canary weights in percent, ascending.",
                ),
                "step": integer("Index of the current step.", minimum=0, default=0),
                "guards": ref("CanaryGuards"),
                "auto_promote": {"type": "boolean", "default": False},
                "step_interval_s": number("Least time on a step before an automatic advance.", minimum=0, default=0),
                "state": string(
                    "Set by the server: a rolled-back canary has weight 0 until a new policy is set.",
                    enum=["progressing", "rolled_back", "promoted"],
                    readOnly=True,
                ),
            },
            ("primary", "canary"),
        ),
        "CanaryGuards": obj(
            {
                "max_error_rate": number("Roll back above this canary error rate.", minimum=0, maximum=1, default=0.05),
                "max_p99_ratio": number("Roll back above this canary/primary p99 ratio.", minimum=0, default=2.0),
                "min_p99_slack_ms": number(
                    "The p99 guard ignores a canary slower than the primary by less than this.", minimum=0, default=5.0
                ),
                "min_requests": integer("Canary requests needed before judging a step.", minimum=0, default=50),
                "min_accuracy_ratio": {
                    "type": ["number", "null"],
                    "minimum": 0,
                    "default": None,
                    "description": "Quality guard: roll back when the canary's accuracy from feedback falls below "
                    "this share of the primary's (null: off). While set, a step is promoted only once both "
                    "versions have min_feedback labels.",
                },
                "min_feedback": integer(
                    "Labels each version needs before the quality guard judges.", minimum=1, default=20
                ),
            },
            additionalProperties=False,
        ),
        "ABPolicy": policy(
            "ab",
            "Weighted split, sticky by a request key (SHA-256 of the key modulo 100).",
            {
                "variants": array(ref("ABVariant"), minItems=1, description="Weights sum to 100; names unique."),
                "sticky_key": string(
                    "Request parameter that keeps a caller on one variant; without it, the key is the "
                    "x-dhow-ab-key header.",
                    default="user_id",
                ),
            },
            ("variants",),
        ),
        "ABVariant": obj(
            {
                "name": string(minLength=1),
                "version": _version_schema("The variant's version."),
                "weight": integer("Percent of requests.", minimum=0, maximum=100),
            },
            ("name", "version", "weight"),
            additionalProperties=False,
        ),
        "ShadowPolicy": policy(
            "shadow",
            "primary answers; a copy goes to shadow off the hot path and the answers are compared.",
            {
                "primary": _version_schema("The version that answers."),
                "shadow": _version_schema("The compared version (not the primary)."),
                "sample": number("Fraction of requests copied.", minimum=0, maximum=1, default=1.0),
                "compare": obj(
                    {},
                    additionalProperties={"enum": ["values", "label"]},
                    description="How each output is compared: 'label' compares a classifier's labels (the "
                    "argmax over the last axis), 'values' (the default) its values.",
                ),
                "tolerances": obj(
                    {},
                    additionalProperties=ref("Tolerance"),
                    description="Per float output, how far the shadow's values may be from the primary's "
                    "(numpy.allclose); outputs left out use rtol 0.001, atol 0.00001.",
                ),
            },
            ("primary", "shadow"),
        ),
        "Tolerance": obj(
            {"rtol": number("Relative tolerance.", minimum=0), "atol": number("Absolute tolerance.", minimum=0)},
            additionalProperties=False,
        ),
        "BlueGreenPolicy": policy(
            "bluegreen",
            "All traffic to the active colour; the other stays loaded for an instant switch.",
            {
                "blue": _version_schema("The blue version."),
                "green": _version_schema("The green version (not the blue)."),
                "active": string(enum=["blue", "green"], default="blue"),
            },
            ("blue", "green"),
        ),
    }


def _deployment_schemas() -> dict[str, Schema]:
    """A deployment, its live figures, the bodies of its edits, its history and events."""
    nullable_policy = {"oneOf": [ref("Policy"), {"type": "null"}]}
    reason = string("Why; recorded in the history.", default="")
    return {
        "Deployment": obj(
            {
                "name": string("The model name clients call."),
                "policy": ref("Policy"),
                "revision": integer("Name it in the next edit.", minimum=1),
                "updated_at": string("UTC, ISO 8601.", format="date-time"),
                "updated_by": string("The actor of the last change."),
                "status": ref("DeploymentStatus"),
            },
            ("name", "policy", "revision", "updated_at", "updated_by"),
        ),
        "DeploymentStatus": {
            "description": "Live figures of the server that answered: a canary's window since its step began, "
            "a shadow's comparison counts; empty for other kinds.",
            "anyOf": [ref("CanaryStatus"), ref("ShadowStatus"), {"type": "object", "maxProperties": 0}],
        },
        "CanaryStatus": obj(
            {
                "weight": integer("Percent of requests the canary gets now.", minimum=0, maximum=100),
                "window": obj({"primary": ref("WindowFigures"), "canary": ref("WindowFigures")}, ("primary", "canary")),
            },
            ("weight", "window"),
        ),
        "WindowFigures": obj(
            {
                "requests": integer(minimum=0),
                "errors": integer("Server-side failures.", minimum=0),
                "p99_ms": {"type": ["number", "null"]},
            },
            ("requests", "errors"),
        ),
        "ShadowStatus": obj({"shadow": ref("ShadowFigures")}, ("shadow",)),
        "ShadowFigures": obj(
            {
                "requests": integer(minimum=0),
                "agreed": integer(minimum=0),
                "disagreed": integer(minimum=0),
                "errors": integer(minimum=0),
                "dropped": integer("Copies dropped because the shadow queue was full.", minimum=0),
                "agreement_rate": {"type": ["number", "null"]},
                "mean_abs_difference": {"type": ["number", "null"], "description": "Over float outputs."},
                "primary_p99_ms": {"type": ["number", "null"]},
                "shadow_p99_ms": {"type": ["number", "null"]},
            },
        ),
        "DeploymentList": obj({"deployments": array(ref("Deployment"))}, ("deployments",)),
        "PutDeploymentRequest": obj(
            {
                "policy": ref("Policy"),
                "revision": integer("The current revision; 0 to create.", minimum=0),
                "reason": reason,
            },
            ("policy", "revision"),
            additionalProperties=False,
        ),
        "DeleteDeploymentRequest": obj(
            {"revision": integer("The current revision.", minimum=1), "reason": reason},
            ("revision",),
            additionalProperties=False,
        ),
        "ActionRequest": obj(
            {"revision": integer("When given, must be the current revision.", minimum=1), "reason": reason},
            additionalProperties=False,
        ),
        "HistoryRow": obj(
            {
                "name": string(),
                "revision": integer("The revision this change produced.", minimum=1),
                "at": string("UTC, ISO 8601.", format="date-time"),
                "actor": string("x-dhow-actor of the request, dhow-analysis for automatic decisions."),
                "action": string(enum=["create", "edit", "promote", "rollback", "switch", "release", "delete"]),
                "reason": string(),
                "before": nullable_policy,
                "after": nullable_policy,
            },
            ("revision", "at", "actor", "action", "reason", "before", "after"),
        ),
        "History": obj({"history": array(ref("HistoryRow"))}, ("history",)),
        "Event": obj(
            {
                "name": string(),
                "at": string("UTC, ISO 8601.", format="date-time"),
                "kind": string("The automatic analysis's decision.", examples=["rollback", "promote"]),
                "details": {
                    "type": "object",
                    "description": "The reason and the figures: error_rate, p99_ratio, weight, guard, and the "
                    "primary and canary windows.",
                    "additionalProperties": True,
                },
            },
            ("at", "kind", "details"),
        ),
        "Events": obj({"events": array(ref("Event"))}, ("events",)),
    }
