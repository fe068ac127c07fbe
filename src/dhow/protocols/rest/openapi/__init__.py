"""The OpenAPI 3.1 document of dhow's REST API (served at ``GET /v2/admin/openapi.json``), derived from the
route table; the shapes it names live once under ``components``."""

from dhow.protocols.rest.openapi.document import openapi_document

__all__ = ["openapi_document"]
