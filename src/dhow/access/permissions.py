"""Roles and permissions: what a principal may do, to which models, of which tenant.

A principal holds grants; a grant is a role scoped to a model-name pattern (``fraud-*``). A permission on a
model is granted when some grant's role has the permission and its pattern matches the model's name, and the
principal's tenant is the model's tenant (the tenant ``*`` spans every tenant). A read without a model whose
answer is filtered to the models the principal may see (server metadata, the repository index, all statistics,
the deployments) needs any grant with the permission; other permissions without a model (metrics, the audit
trail, API keys) need a grant whose pattern is ``*``.

Every door maps each of its routes or methods to one ``Permission`` (or to ``None`` for the open health
checks); a test enumerates every route and method so that none is left unmapped.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from dhow.core.errors import Forbidden, InvalidInput
from dhow.core.model_config import DEFAULT_TENANT

__all__ = [
    "ALL_TENANTS",
    "DEFAULT_TENANT",
    "ROLES",
    "Grant",
    "Permission",
    "Principal",
    "check_permission",
    "parse_grant",
]

#: the tenant of principals that span every tenant (the first admin key)
ALL_TENANTS = "*"


class Permission(enum.Enum):
    SERVER_READ = "server.read"  # server metadata, the OpenAPI document
    MODEL_READ = "model.read"  # model metadata, config, readiness, the repository index
    STATS_READ = "stats.read"  # model statistics
    METRICS_READ = "metrics.read"  # Prometheus metrics
    INFER = "infer"
    MODEL_MANAGE = "model.manage"  # load and unload
    DEPLOYMENT_READ = "deployment.read"
    DEPLOYMENT_WRITE = "deployment.write"  # rollouts: create, edit, promote, roll back, delete
    AUDIT_READ = "audit.read"
    ACCESS_MANAGE = "access.manage"  # API keys

    #: members are singletons compared by identity: hashed by identity too, in C (Enum's own ``__hash__`` is a
    #: Python call, and every request hashes its permission for the decisions' cache)
    __hash__ = object.__hash__

    @property
    def audited(self) -> bool:
        """Whether every use is recorded in the audit trail (changes and inference; reads are not)."""
        return self in _AUDITED


#: reads whose answer without a model (the server's metadata, the repository index, all statistics, the
#: deployments) is filtered down to the models the principal may see: a scoped grant may make them
_SCOPED_READS = frozenset(
    {Permission.SERVER_READ, Permission.MODEL_READ, Permission.STATS_READ, Permission.DEPLOYMENT_READ}
)
_AUDITED = frozenset({Permission.INFER, Permission.MODEL_MANAGE, Permission.DEPLOYMENT_WRITE, Permission.ACCESS_MANAGE})
_READ = frozenset({Permission.SERVER_READ, Permission.MODEL_READ})

#: what each role may do
ROLES: dict[str, frozenset[Permission]] = {
    "admin": frozenset(Permission),
    "deployer": _READ
    | {Permission.STATS_READ, Permission.MODEL_MANAGE, Permission.DEPLOYMENT_READ, Permission.DEPLOYMENT_WRITE},
    "invoker": _READ | {Permission.INFER},
    "auditor": _READ
    | {Permission.STATS_READ, Permission.METRICS_READ, Permission.DEPLOYMENT_READ, Permission.AUDIT_READ},
}


@dataclass(frozen=True, slots=True)
class Grant:
    role: str
    #: model-name pattern (shell style: ``*``, ``fraud-*``)
    models: str = "*"

    def __str__(self) -> str:
        return self.role if self.models == "*" else f"{self.role}:{self.models}"


def parse_grant(text: str) -> Grant:
    """``invoker`` or ``invoker:fraud-*``; an unknown role is refused with the known ones."""
    if not isinstance(text, str) or not text.strip():
        raise InvalidInput(f"a role must be a non-empty string like 'invoker' or 'invoker:fraud-*', got {text!r}")
    role, _, models = text.strip().partition(":")
    if role not in ROLES:
        raise InvalidInput(f"unknown role {role!r}; the roles are {', '.join(ROLES)}")
    return Grant(role, models or "*")


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as authentication established it."""

    #: how the audit trail names them: ``key:ci-bot``, ``jwt:alice``, ``cert:svc-a``, ``anonymous``
    name: str
    tenant: str
    grants: tuple[Grant, ...]
    #: the data region of their requests when a request names none
    region: str = ""
    #: the stored principal's id (an API key's id, ``cert:<CN>``), for its quotas; "" for JWT principals
    record_id: str = ""
    #: cache of decisions: (permission, model, model tenant) -> allowed
    _decisions: dict[tuple[Permission, str, str], bool] = field(default_factory=dict, compare=False, repr=False)

    def may(self, permission: Permission, model: str = "", model_tenant: str = DEFAULT_TENANT) -> bool:
        key = (permission, model, model_tenant)
        decision = self._decisions.get(key)
        if decision is None:
            decision = self._decide(permission, model, model_tenant)
            if len(self._decisions) < 4096:  # bounded: model names come from clients
                self._decisions[key] = decision
        return decision

    def _decide(self, permission: Permission, model: str, model_tenant: str) -> bool:
        if model and self.tenant not in (ALL_TENANTS, model_tenant):
            return False
        for grant in self.grants:
            if permission not in ROLES[grant.role]:
                continue
            if grant.models == "*" or (fnmatchcase(model, grant.models) if model else permission in _SCOPED_READS):
                return True
        return False


def check_permission(principal: Principal, permission: Permission, model: str = "", model_tenant: str = "") -> None:
    """Raise ``Forbidden`` saying what is missing, unless the principal may."""
    tenant = model_tenant or DEFAULT_TENANT
    if principal.may(permission, model, tenant):
        return
    target = f" on model '{model}'" if model else ""
    if model and principal.tenant not in (ALL_TENANTS, tenant):
        raise Forbidden(
            f"{principal.name} (tenant '{principal.tenant}') may not use model '{model}' of tenant '{tenant}'"
        )
    roles = ", ".join(str(g) for g in principal.grants) or "none"
    granting = [role for role, permissions in ROLES.items() if permission in permissions]
    # the narrowest role that grants it, other than admin: least privilege as the example
    narrowest = min((r for r in granting if r != "admin"), key=lambda r: len(ROLES[r]), default="")
    if model:
        example = f" (e.g. '{narrowest}:{model}')" if narrowest else ""
    else:  # a permission of no model: only a grant on every model ('*') carries it
        held = sorted({g.role for g in principal.grants if g.role in granting})
        example = f" unscoped (its {', '.join(held)} grant is scoped to some models)" if held else ""
    raise Forbidden(
        f"{principal.name} lacks permission '{permission.value}'{target} (its roles: {roles}); "
        f"roles that grant it: {', '.join(granting)}{example}"
    )
