"""The REST door: the Open Inference Protocol v2 over HTTP, as a pure ASGI application."""

from dhow.protocols.rest.app import RestApp

__all__ = ["RestApp"]
