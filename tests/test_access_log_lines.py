"""An access log line is one line whatever the principal's name holds."""

from __future__ import annotations

import logging
import time

import pytest

from dhow.protocols.rest.access_log import AccessLog


@pytest.mark.parametrize("started", [False, True])
def test_a_principal_with_a_newline_cannot_forge_a_line(started: bool, caplog: pytest.LogCaptureFixture) -> None:
    log = AccessLog(enabled=True)
    scope = {"method": "POST", "path": "/v2/models/fraud/infer", "raw_path": b"/v2/models/fraud/infer"}
    forged = "jwt:alice\nPOST /v2/models/fraud/infer 200 0.1ms principal=jwt:admin request_id=x\x00"
    with caplog.at_level(logging.INFO):
        if started:
            log.start()
        try:
            log.write(scope, 200, 0.002, forged, "r-1")
            log.write(scope, 200, 0.002, "key:ci-bot", "r-2")
        finally:
            if started:
                log.close()
        for _ in range(100):
            if len(caplog.records) >= 2:
                break
            time.sleep(0.01)
    lines = [record.getMessage() for record in caplog.records if "request_id=r-" in record.getMessage()]
    assert len(lines) == 2 and all("\n" not in line and "\x00" not in line for line in lines)
    assert "principal=jwt:alice\\nPOST /v2/models/fraud/infer 200 0.1ms principal=jwt:admin" in lines[0]
    assert lines[1].endswith("principal=key:ci-bot request_id=r-2")
