"""Where a stream reads or writes: ``kafka://HOST:PORT[,HOST:PORT…]/TOPIC[?option=value…]``.

The options of the query are passed to the Kafka client as they are (librdkafka's names, e.g.
``?security.protocol=SSL``), so a user never waits for dhow to learn a setting of their broker.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from dhow.core.errors import InvalidInput, Unsupported

__all__ = ["SCHEMES", "Endpoint", "parse_endpoint"]

#: the transports a stream can use
SCHEMES = ("kafka",)
#: a Kafka topic name: the broker's own rule
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


@dataclass(frozen=True, slots=True)
class Endpoint:
    scheme: str
    #: the brokers' addresses, comma-separated (librdkafka's bootstrap.servers)
    servers: str
    topic: str
    #: client settings from the URL's query
    options: dict[str, str] = field(default_factory=dict)
    #: the URL as given (without its query: options may hold secrets)
    url: str = ""

    def __str__(self) -> str:
        return self.url


def parse_endpoint(text: str, what: str) -> Endpoint:
    """An endpoint from its URL, or a message naming ``what`` (``--source``) and the form expected."""
    form = f"{what} expects kafka://HOST:PORT/TOPIC"
    parts = urlsplit(text)
    if parts.scheme == "kinesis":
        raise Unsupported(f"{what} {text!r}: Kinesis streams are not supported yet; use kafka://HOST:PORT/TOPIC")
    if parts.scheme not in SCHEMES:
        raise InvalidInput(f"{form}, got {text!r}")
    servers, topic = parts.netloc, parts.path.strip("/")
    if not servers or not all(_host_port(s) for s in servers.split(",")):
        raise InvalidInput(f"{form}: {text!r} names no HOST:PORT of a broker")
    if not _TOPIC.match(topic):
        raise InvalidInput(
            f"{form}: {text!r} names no valid topic (letters, digits, '.', '_' and '-', at most 249 of them)"
        )
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    return Endpoint(parts.scheme, servers, topic, options, f"{parts.scheme}://{servers}/{topic}")


def _host_port(text: str) -> bool:
    host, _, port = text.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536
