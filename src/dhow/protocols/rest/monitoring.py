"""The monitoring routes of the REST door: a version's drift report, and feedback (ground truth) for a model.

Like the peers' handlers these are ``RestApp``'s (this class is one of its bases): each request has passed the
admission point; the work is the data plane's ``ModelWatch``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import orjson

from dhow.core.errors import InvalidInput, NotFound
from dhow.serving.dataplane import DataPlane
from dhow.serving.watch import ModelWatch

if TYPE_CHECKING:
    from dhow.protocols.rest.app import Answer, Request
    from dhow.serving.service import Call

__all__ = ["MonitoringRoutes"]

_JSON = [(b"content-type", b"application/json")]


class MonitoringRoutes:
    """The drift and feedback handlers of the REST door (a base of ``RestApp``)."""

    dataplane: DataPlane

    def _watch(self) -> ModelWatch:
        watch = self.dataplane.watch
        if watch is None:
            raise NotFound("model monitoring is not enabled on this server")
        return watch

    async def _drift(self, request: Request, call: Call) -> Answer:
        report = self._watch().drift_report(request.match.model, request.match.version)
        return 200, _JSON, orjson.dumps(report)

    async def _feedback(self, request: Request, call: Call) -> Answer:
        body = await request.json_body()
        unknown = sorted(set(body) - {"labels"})
        if unknown or "labels" not in body:
            raise InvalidInput(
                'the body must be {"labels": {"<request id>": <label>, ...}}'
                + (f"; unknown field {unknown[0]!r}" if unknown else "")
            )
        result = await self._watch().feedback.receive(request.match.model, body["labels"], call.caller.tenant)
        call.note(joined=result["joined"], unmatched=result["unmatched"])
        return 200, _JSON, orjson.dumps(result)
