"""The component schemas and query parameters of the access admin API: API keys and the audit trail."""

from __future__ import annotations

from typing import Any

from dhow.protocols.rest.openapi.schema import Schema, array, integer, number, obj, ref, string

__all__ = ["access_schemas", "audit_parameters"]


def access_schemas() -> dict[str, Schema]:
    return {
        "ApiKey": obj(
            {
                "id": string(),
                "kind": string(enum=["key", "cert"]),
                "name": string(),
                "tenant": string(),
                "roles": array(string()),
                "region": string(),
                "rate": number(),
                "burst": integer(),
                "concurrency": integer(),
                "created_at": string(),
                "created_by": string(),
                "expires_at": {"type": ["string", "null"]},
                "revoked_at": {"type": ["string", "null"]},
                "replaced_by": {"type": ["string", "null"]},
                "active": {"type": "boolean"},
                "key": string("The secret API key: only in the answer that makes it."),
            }
        ),
        "KeyList": obj({"keys": array(ref("ApiKey"))}),
        "NewKey": obj(
            {
                "name": string("What the key is for."),
                "roles": array(string("admin, deployer, invoker or auditor, optionally 'role:model-pattern'.")),
                "tenant": string(
                    "Default: the caller's tenant; for a caller of every tenant, 'default' ('*' only when asked)."
                ),
                "region": string("The data region of its requests when they name none."),
                "rate": number("Requests per second (0 = unlimited)."),
                "burst": integer(minimum=0),
                "concurrency": integer(minimum=0),
                "expires_in_s": number(exclusiveMinimum=0),
            },
            ("name", "roles"),
            additionalProperties=False,
        ),
        "RotateKeyRequest": obj({"grace_s": number("Seconds the old key works.", minimum=0)}),
        "AuditRecords": obj(
            {"records": array({"type": "object", "description": "An audit record with its seq, prev_hash and hash."})}
        ),
        "AuditVerdict": obj({"ok": {"type": "boolean"}, "problems": array(string())}),
    }


def audit_parameters() -> dict[str, Any]:
    """The filters of ``GET /v2/admin/audit``, as component parameters ``Audit<Name>``."""
    return {
        f"Audit{name.capitalize()}": {
            "name": name,
            "in": "query",
            "required": False,
            "schema": schema,
            "description": description,
        }
        for name, schema, description in (
            ("since", integer(minimum=0), "Records after this sequence number."),
            ("limit", integer(minimum=1, maximum=10_000), "At most this many (default 1000)."),
            ("actor", string(), "Only this principal's."),
            ("model", string(), "Only this model's."),
            ("kind", string(enum=["admin", "inference", "denial"]), "Only this kind."),
            ("outcome", string(), "Only this outcome (success or an error code)."),
            ("region", string(), "The audit store of this data region (default: this server's)."),
        )
    }
