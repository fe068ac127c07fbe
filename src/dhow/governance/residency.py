"""Data residency: may data of region X be processed by this server, which runs in region Y?

A request's data region is, first found: the request's own (``data_region`` parameter or the
``x-dhow-data-region`` header / gRPC metadata), its key's or tenant's default, the model's region. The policy
maps each data region to the regions where it may be processed; a data region the policy does not list may be
processed only in its own region. Data with no region at all is processed unless the policy says
``unspecified: deny``. A refusal is ``Forbidden`` with the reason, and the caller's door audits it.

    # residency.yaml
    regions:
      ae: [ae]          # UAE data stays in the UAE
      eu: [eu, ae]      # EU data may also be processed in the UAE deployment
    unspecified: allow  # or deny: every request must carry a data region
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from dhow.core.errors import Forbidden, InvalidInput
from dhow.core.names import check_region_name

__all__ = ["ResidencyPolicy", "check_region_name"]


@dataclass(frozen=True, slots=True)
class ResidencyPolicy:
    #: data region -> regions where it may be processed
    allowed: Mapping[str, frozenset[str]] = field(default_factory=dict)
    allow_unspecified: bool = True

    @classmethod
    def parse(cls, data: object, where: str) -> ResidencyPolicy:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise InvalidInput(f"{where}: expected a mapping with 'regions' and 'unspecified'")
        unknown = sorted(set(map(str, data)) - {"regions", "unspecified"})
        if unknown:
            raise InvalidInput(f"{where}: unknown field {unknown[0]!r} (known: regions, unspecified)")
        regions = data.get("regions") or {}
        if not isinstance(regions, dict):
            raise InvalidInput(f"{where}: 'regions' must map a data region to a list of processing regions")
        allowed: dict[str, frozenset[str]] = {}
        for region, places in regions.items():
            name = check_region_name(str(region), f"{where}: regions")
            if not isinstance(places, list) or not places:
                raise InvalidInput(f"{where}: regions.{name} must be a non-empty list of regions, got {places!r}")
            allowed[name] = frozenset(check_region_name(str(p), f"{where}: regions.{name}") for p in places)
        unspecified = data.get("unspecified", "allow")
        if unspecified not in ("allow", "deny"):
            raise InvalidInput(f"{where}: 'unspecified' must be allow or deny, got {unspecified!r}")
        return cls(allowed, unspecified == "allow")

    @classmethod
    def load(cls, path: str) -> ResidencyPolicy:
        if not path:
            return cls()
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise InvalidInput(f"cannot read the residency policy {path}: {exc}") from None
        return cls.parse(data, path)

    def places(self, data_region: str) -> frozenset[str]:
        return self.allowed.get(data_region, frozenset({data_region}))

    def check(self, data_region: str, server_region: str) -> None:
        """Refuse (``Forbidden``, with the reason) data that may not be processed in ``server_region``."""
        if not data_region:
            if not self.allow_unspecified:
                raise Forbidden(
                    "this server's residency policy needs every request to name its data region "
                    "(the data_region parameter or the x-dhow-data-region header)"
                )
            return
        places = self.places(data_region)
        if server_region not in places:
            raise Forbidden(
                f"data of region '{data_region}' may not be processed in region '{server_region}' (this server); "
                f"it may be processed in: {', '.join(sorted(places))}"
            )
