"""The component schemas of model monitoring: drift reports and feedback (README, "Monitoring")."""

from __future__ import annotations

from dhow.protocols.rest.openapi.schema import Schema, array, integer, number, obj, ref, string

__all__ = ["monitoring_schemas"]


def monitoring_schemas() -> dict[str, Schema]:
    label = {"type": ["string", "number", "integer", "boolean"]}
    return {
        "FeatureDrift": obj(
            {
                "name": string("The feature: a column of the profiled data."),
                "side": string("input, or output (the prediction distribution).", enum=["input", "output"]),
                "method": string("psi (numbers) or js (categories: Jensen-Shannon distance).", enum=["psi", "js"]),
                "score": number(),
                "drifted": {"type": "boolean", "description": "Whether the score is above the threshold."},
                "rows": integer("Rows the score rests on."),
            },
            ("name", "side", "method", "score", "drifted", "rows"),
        ),
        "DriftReport": obj(
            {
                "model": string(),
                "version": string(),
                "profile": {"type": "boolean", "description": "Whether the version has a reference profile."},
                "state": string(enum=["no_profile", "waiting", "ok", "drift"]),
                "reason": string("Why there are no scores (no_profile, waiting)."),
                "threshold": number(),
                "sample_rate": number(),
                "rows": integer("Sampled rows in the window."),
                "scored_seconds_ago": number(),
                "drifted": array(string(), description="The features above the threshold."),
                "features": array(ref("FeatureDrift"), description="Every feature, the worst first."),
            },
            ("model", "version", "profile", "state", "features"),
        ),
        "FeedbackRequest": obj(
            {
                "labels": {
                    "type": "object",
                    "description": "Request id -> its label, or a list of labels for a request of several rows.",
                    "additionalProperties": {"oneOf": [label, array(label)]},
                    "examples": [{"req-1": 1, "req-2": 0}],
                }
            },
            ("labels",),
            additionalProperties=False,
        ),
        "FeedbackResult": obj(
            {
                "joined": integer("Labels joined to a prediction."),
                "unmatched": integer("Labels of request ids this server process holds no prediction of."),
                "unmatched_ids": array(string(), description="The first 100 of them."),
                "already_joined": integer("Labels of requests labelled before (a request is labelled once)."),
                "already_joined_ids": array(string(), description="The first 100 of them."),
                "rejected": {
                    "type": "object",
                    "additionalProperties": string(),
                    "description": "Id -> why its label does not fit the prediction (kept: send it again, fixed).",
                },
                "pending": integer("Predictions still awaiting their label."),
                "dropped": integer("Predictions dropped unlabelled (the oldest, beyond monitoring.feedback.pending)."),
                "replaced": integer("Predictions replaced by a newer answer to a request of the same tenant and id."),
                "quality": {
                    "type": "object",
                    "description": "Per version the labels were joined to: its figures over its newest labels.",
                    "additionalProperties": obj(
                        {
                            "labels": integer(),
                            "accuracy": number(),
                            "precision": number(),
                            "recall": number(),
                            "mae": number(),
                            "rmse": number(),
                        }
                    ),
                },
            },
            ("joined", "unmatched", "quality"),
        ),
    }
