"""Where a stream reads or writes: ``kafka://HOST:PORT[,HOST:PORT…]/TOPIC[?option=value…]`` or
``kinesis://STREAM[?region=R&endpoint=URL&lease_s=S]``.

The options of a Kafka URL's query are passed to the Kafka client as they are (librdkafka's names, e.g.
``?security.protocol=SSL``), so a user never waits for dhow to learn a setting of their broker. A Kinesis URL
takes the AWS region (default: the AWS client's own, e.g. ``AWS_DEFAULT_REGION``), an endpoint (a local server
or a VPC endpoint) and how long a shard lease lasts; credentials come from the AWS client's usual chain.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from dhow.core.errors import InvalidInput

__all__ = ["SCHEMES", "Endpoint", "parse_endpoint"]

#: the transports a stream can use
SCHEMES = ("kafka", "kinesis")
#: a Kafka topic name: the broker's own rule
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")
#: a Kinesis stream name: the service's own rule
_STREAM = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
#: what a kinesis:// URL's query may say
KINESIS_OPTIONS = ("region", "endpoint", "lease_s")


@dataclass(frozen=True, slots=True)
class Endpoint:
    scheme: str
    #: the brokers' addresses, comma-separated (librdkafka's bootstrap.servers); Kinesis: its endpoint or region
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
    form = f"{what} expects kafka://HOST:PORT/TOPIC or kinesis://STREAM?region=REGION"
    parts = urlsplit(text)
    if parts.scheme == "kinesis":
        return _kinesis(parts.netloc + parts.path, parts.query, text, what)
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


def _kinesis(stream: str, query: str, text: str, what: str) -> Endpoint:
    form = f"{what} expects kinesis://STREAM[?region=REGION&endpoint=URL&lease_s=SECONDS]"
    stream = stream.strip("/")
    if not _STREAM.match(stream):
        raise InvalidInput(f"{form}: {text!r} names no valid stream (letters, digits, '.', '_' and '-', at most 128)")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(KINESIS_OPTIONS))
    if unknown:
        raise InvalidInput(f"{form}: unknown option {unknown[0]!r} in {text!r} (known: {', '.join(KINESIS_OPTIONS)})")
    endpoint = options.get("endpoint", "")
    if endpoint and urlsplit(endpoint).scheme not in ("http", "https"):
        raise InvalidInput(f"{form}: endpoint {endpoint!r} must be an http:// or https:// URL")
    lease = options.get("lease_s", "10")
    try:
        if not 1 <= float(lease) <= 3600:
            raise ValueError
    except ValueError:
        raise InvalidInput(f"{form}: lease_s must be a number of seconds between 1 and 3600, got {lease!r}") from None
    servers = endpoint or f"aws:{options.get('region', '')}"
    return Endpoint("kinesis", servers, stream, options, f"kinesis://{stream}")


def _host_port(text: str) -> bool:
    host, _, port = text.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536
