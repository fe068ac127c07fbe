"""The HTTP side of ``dhow rollout``: the server's address and the admin API's requests (standard library only)."""

from __future__ import annotations

import http.client
import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from dhow.rollouts.cli.errors import ServerRefused, Unreachable, UsageError

__all__ = ["ADMIN", "DEFAULT_URL", "TIMEOUT_S", "AdminClient", "base_url", "deployment_path", "items"]

DEFAULT_URL = "http://127.0.0.1:8080"
#: seconds a request may wait for the server (an edit may load model versions before it answers)
TIMEOUT_S = 300.0
ADMIN = "/v2/admin/deployments"


def base_url(given: str | None) -> str:
    """The server's address: ``--url``, else ``$DHOW_URL``, else the default; refused unless http(s)."""
    url = (given or os.environ.get("DHOW_URL") or DEFAULT_URL).strip()
    if "://" not in url:
        url = "http://" + url
    try:
        parts = urllib.parse.urlsplit(url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and (parts.port or 1) > 0
    except ValueError:  # a malformed IPv6 address, a port out of range
        valid = False
    if not valid or any(c.isspace() for c in url):
        raise UsageError(f"--url (or DHOW_URL) must be an http:// or https:// address, got {given or url!r}")
    return url.rstrip("/")


def deployment_path(name: str, action: str = "") -> str:
    path = f"{ADMIN}/{urllib.parse.quote(name, safe='')}"
    return f"{path}/{action}" if action else path


def items(answer: Any, key: str) -> list[dict[str, Any]]:
    """The objects of the answer's ``key`` list; refused when the answer has none."""
    found = answer.get(key) if isinstance(answer, dict) else None
    if not isinstance(found, list):
        raise ServerRefused(200, f"the answer has no '{key}' list")
    return [item for item in found if isinstance(item, dict)]


class AdminClient:
    """JSON requests to one server's admin API, as one actor."""

    def __init__(self, url: str, actor: str) -> None:
        self.url = url
        self.headers = {"x-dhow-actor": actor, "content-type": "application/json", "accept": "application/json"}
        key = os.environ.get("DHOW_KEY", "").strip()
        if key:  # the server names the key's principal as the actor; x-dhow-actor counts only without auth
            self.headers["authorization"] = f"Bearer {key}"
        # a private CA (self-signed test certificates): DHOW_CACERT=ca.pem
        cafile = os.environ.get("DHOW_CACERT") or None
        self.context = ssl.create_default_context(cafile=cafile) if url.startswith("https:") else None

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """The decoded JSON answer; ``ServerRefused`` for an error status, ``Unreachable`` for no answer."""
        raw = self._exchange(method, path, body)
        try:
            return json.loads(raw) if raw.strip() else {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ServerRefused(200, f"the answer of {method} {path} is not JSON: {raw[:200]!r}") from None

    def _exchange(self, method: str, path: str, body: dict[str, Any] | None) -> bytes:
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=self.headers)
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_S, context=self.context) as answer:
                raw: bytes = answer.read()
                return raw
        except urllib.error.HTTPError as exc:
            try:
                refusal = exc.read()
            except (OSError, http.client.HTTPException):
                refusal = b""
            finally:
                exc.close()
            raise ServerRefused(exc.code, _error_message(exc.code, refusal, exc.reason)) from None
        except urllib.error.URLError as exc:
            raise Unreachable(_reason(exc.reason)) from None
        except (OSError, http.client.HTTPException) as exc:
            raise Unreachable(_reason(exc)) from None

    def current_revision(self, name: str, *, missing: int | None) -> int:
        """The deployment's revision; ``missing`` when there is none (re-raise the 404 if None)."""
        try:
            deployment = self.call("GET", deployment_path(name))
        except ServerRefused as exc:
            if exc.status == 404 and missing is not None:
                return missing
            raise
        revision = deployment.get("revision") if isinstance(deployment, dict) else None
        if not isinstance(revision, int):
            raise ServerRefused(200, f"the deployment '{name}' came back without a revision")
        return revision


def _reason(reason: object) -> str:
    if isinstance(reason, TimeoutError):
        return f"no answer in {TIMEOUT_S:g} s"
    if isinstance(reason, OSError) and reason.strerror:
        return reason.strerror
    return str(reason) or type(reason).__name__


def _error_message(status: int, body: bytes, reason: str) -> str:
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        document = None
    if isinstance(document, dict) and isinstance(document.get("error"), str):
        return str(document["error"])
    text = body.decode("utf-8", "replace").strip()
    return text[:300] if text else (reason or f"HTTP error {status}")
