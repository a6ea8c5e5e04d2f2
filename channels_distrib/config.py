"""Validation of the layer's ``CONFIG``: done once, at construction, with messages saying what to write.

Every ``channels_redis`` option is accepted with its meaning, so moving over is a one-line
``BACKEND`` change. The result is a frozen :class:`LayerConfig` the rest of the package reads.
"""

from __future__ import annotations

import fnmatch
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from django.core.exceptions import ImproperlyConfigured

from .amqp_url import EXAMPLE, BadBrokerURL, check_broker_url
from .masking import mask_url, redact

logger = logging.getLogger(__name__)

MIB = 1024 * 1024
MIN_MESSAGE_SIZE = MIB
PREFIX_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,64}$")
NODE_ID_RE = re.compile(r"^[A-Za-z0-9_.\-:]{1,100}$")


@dataclass(frozen=True)
class HostConfig:
    """Where Redis is: a URL with connection kwargs, or a Sentinel set with a master name."""

    url: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str | None = None
    sentinel_kwargs: dict[str, Any] = field(default_factory=dict)
    #: A Redis Cluster startup node (``{"address": ..., "cluster": True}``): the client
    #: discovers the other masters from it.
    cluster: bool = False

    @property
    def address(self) -> str:
        """A readable address for error messages (never includes a password)."""
        if self.sentinels:
            hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"sentinel://{hosts}/{self.master_name}"
        parsed = urlparse(self.url or "")
        if parsed.scheme == "unix":
            return f"unix://{parsed.path}"
        return f"{parsed.scheme}://{parsed.hostname}:{parsed.port or 6379}{parsed.path or ''}"


@dataclass(frozen=True)
class LayerConfig:
    """The validated options of one :class:`~channels_distrib.layers.DistributedChannelLayer`."""

    host: HostConfig
    prefix: str
    expiry: float
    group_expiry: float
    capacity: int
    channel_capacity: tuple[tuple[re.Pattern[str], int], ...]
    serializer: str
    symmetric_encryption_keys: tuple[str, ...]
    node_id: str | None
    heartbeat_interval: float
    node_timeout: float
    max_message_size: int
    max_meta_size: int
    retry_timeout: float
    connection_limit: int | None
    presence_interval: float = 0.1
    #: ``amqp://`` / ``amqps://`` URL of RabbitMQ when it carries the messages (else None).
    broker: str | None = None
    #: With ``broker``: publish persistent messages (delivery mode 2), which survive a broker
    #: restart in the durable queues, at about twice the confirm latency (README "RabbitMQ").
    broker_persistent: bool = False

    def capacity_for(self, channel: str) -> int:
        """The capacity of one channel: the first matching ``channel_capacity`` glob, else ``capacity``."""
        for regex, value in self.channel_capacity:
            if regex.match(channel):
                return value
        return self.capacity


def _fail(message: str) -> ImproperlyConfigured:
    return ImproperlyConfigured(f"channels_distrib: {message}")


def _number(name: str, value: Any, *, minimum: float = 0.0, strict: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(
            f"{name} must be a number of seconds, e.g. {name}={minimum + 1!r}; got {value!r}"
        )
    if value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise _fail(f"{name} must be {relation} {minimum}; got {value!r}")
    return float(value)


def _int(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(f"{name} must be an integer >= {minimum}; got {value!r}")
    if value < minimum:
        raise _fail(f"{name} must be an integer >= {minimum}; got {value!r}")
    return value


def _decode_url(url: str) -> str:
    parsed = urlparse(url)
    shown = mask_url(url)  # messages never carry the password
    try:
        parsed.port  # noqa: B018 - urlparse validates the port lazily
    except ValueError:
        raise _fail(
            f"host URL {shown!r} has an invalid port; write e.g. 'redis://127.0.0.1:6379/0'"
        ) from None
    if parsed.scheme not in {"redis", "rediss", "unix", "valkey", "valkeys"}:
        raise _fail(
            f"host URL {shown!r} has no redis://, rediss:// or unix:// scheme; "
            "write e.g. hosts=['redis://127.0.0.1:6379/0']"
        )
    if parsed.scheme == "unix" and not parsed.path:
        raise _fail(f"unix host URL {shown!r} has no socket path; write 'unix:///path/to/redis.sock'")
    if parsed.scheme != "unix" and not parsed.hostname:
        raise _fail(f"host URL {shown!r} has no host name; write e.g. 'redis://127.0.0.1:6379/0'")
    if parsed.scheme.startswith("valkey"):
        url = "redis" + url[len("valkey") :]
    return url


def _decode_address(address: Any) -> str:
    if isinstance(address, str):
        return _decode_url(address)
    if (
        isinstance(address, (tuple, list))
        and len(address) == 2
        and isinstance(address[0], str)
        and isinstance(address[1], int)
    ):
        return f"redis://{address[0]}:{address[1]}/0"
    raise _fail(
        f"host address {redact(address)!r} is not a URL or a (host, port) pair; "
        "write e.g. 'redis://127.0.0.1:6379/0' or ('127.0.0.1', 6379)"
    )


def _connection_options() -> frozenset[str]:
    """Keyword arguments redis-py's connection classes accept (what a host dict may carry)."""
    import inspect

    from redis.asyncio.connection import (
        AbstractConnection,
        Connection,
        SSLConnection,
        UnixDomainSocketConnection,
    )

    names: set[str] = {"max_connections", "ssl"}
    for cls in (AbstractConnection, Connection, SSLConnection, UnixDomainSocketConnection):
        names.update(inspect.signature(cls.__init__).parameters)
    return frozenset(names - {"self", "args", "kwargs", "decode_responses", "encoding"})


def _check_options(host: Any, options: dict[str, Any]) -> dict[str, Any]:
    allowed = _connection_options()
    unknown = sorted(name for name in options if name not in allowed)
    if unknown:
        raise _fail(
            f"host {redact(host)!r} has unknown option(s) {', '.join(map(repr, unknown))}; a host dict takes "
            "'address' (or 'sentinels' + 'master_name', or 'host'/'port'/'db') plus redis-py "
            "connection options such as 'password', 'username', 'ssl_cert_reqs'"
        )
    return options


def decode_host(host: Any) -> HostConfig:
    """Normalise one channels_redis ``hosts`` entry: URL, (host, port), dict, or Sentinel dict."""
    if isinstance(host, Mapping):
        options = dict(host)
        if "sentinels" in options:
            sentinels = options.pop("sentinels")
            master_name = options.pop("master_name", None)
            sentinel_kwargs = options.pop("sentinel_kwargs", None) or {}
            if not isinstance(master_name, str) or not master_name:
                raise _fail(
                    "a Sentinel host needs 'master_name', e.g. {'sentinels': [...], 'master_name': 'mymaster'}"
                )
            pairs: list[tuple[str, int]] = []
            if not isinstance(sentinels, Sequence) or isinstance(sentinels, str) or not sentinels:
                raise _fail("'sentinels' must be a non-empty list of (host, port) pairs")
            for item in sentinels:
                if (
                    isinstance(item, (tuple, list))
                    and len(item) == 2
                    and isinstance(item[0], str)
                    and isinstance(item[1], int)
                ):
                    pairs.append((item[0], item[1]))
                else:
                    raise _fail(
                        f"Sentinel address {redact(item)!r} must be a (host, port) pair like ('127.0.0.1', 26379)"
                    )
            if not isinstance(sentinel_kwargs, Mapping):
                raise _fail("'sentinel_kwargs' must be a dict of connection options")
            options.pop("address", None)
            if options.pop("cluster", False):
                raise _fail(
                    "a host has both 'sentinels' and 'cluster'; Redis Cluster needs no "
                    "Sentinel: write {'address': 'redis://10.0.0.1:7000', 'cluster': True}"
                )
            return HostConfig(
                sentinels=tuple(pairs),
                master_name=master_name,
                sentinel_kwargs=dict(sentinel_kwargs),
                kwargs=_check_options(host, options),
            )
        cluster = options.get("cluster", False)
        if not isinstance(cluster, bool):
            raise _fail(f"'cluster' must be True or False; got {cluster!r}")
        if cluster and "address" not in options and "sentinels" not in options:
            raise _fail(
                "a cluster host needs an 'address' of any cluster node; write "
                "{'address': 'redis://10.0.0.1:7000', 'cluster': True}"
            )
        if not cluster:
            options.pop("cluster", None)
        if "address" not in options:
            # channels_redis passes such a dict to ConnectionPool(**dict): host, port, db, ...
            host_name = options.pop("host", "localhost")
            port = options.pop("port", 6379)
            db = options.pop("db", 0)
            if (
                not isinstance(host_name, str)
                or not isinstance(port, int)
                or not isinstance(db, int)
            ):
                raise _fail(
                    f"host dict {redact(host)!r} needs an 'address', e.g. "
                    "{'address': 'redis://127.0.0.1:6379/0'}, or 'host' (str), 'port' and 'db' (int)"
                )
            if "master_name" in options or "sentinel_kwargs" in options:
                raise _fail(
                    f"host dict {redact(host)!r} names a master but no 'sentinels'; write "
                    "{'sentinels': [('127.0.0.1', 26379)], 'master_name': 'mymaster'}"
                )
            return HostConfig(
                url=f"redis://{host_name}:{port}/{db}", kwargs=_check_options(host, options)
            )
        url = _decode_address(options.pop("address"))
        if options.pop("cluster", False):
            return _cluster_host(host, url, options)
        return HostConfig(url=url, kwargs=_check_options(host, options))
    return HostConfig(url=_decode_address(host))


def _cluster_host(host: Any, url: str, options: dict[str, Any]) -> HostConfig:
    """A Redis Cluster startup node: redis:// or rediss:// (a password may be in the URL or
    the dict), database 0 only, since a cluster has no other."""
    parsed = urlparse(url)
    shown = mask_url(url)
    if parsed.scheme not in {"redis", "rediss"}:
        raise _fail(
            f"cluster host {shown!r} must be a redis:// or rediss:// URL of any cluster node; "
            "write e.g. {'address': 'redis://10.0.0.1:7000', 'cluster': True}"
        )
    if parsed.path.strip("/") not in {"", "0"}:
        raise _fail(
            f"cluster host {shown!r} names database {parsed.path.strip('/')!r}; Redis Cluster "
            "has only database 0, write e.g. {'address': 'redis://10.0.0.1:7000', 'cluster': True}"
        )
    if "max_connections" in options:
        raise _fail(
            "a cluster host takes no 'max_connections' (redis-py keeps a pool per master); "
            "remove it"
        )
    return HostConfig(url=url, kwargs=_check_options(host, options), cluster=True)


def decode_hosts(hosts: Any) -> HostConfig:
    """Validate ``hosts``; one host (or one Sentinel set) backs the whole layer."""
    if hosts is None or (isinstance(hosts, (list, tuple)) and not hosts):
        return HostConfig(url="redis://localhost:6379/0")  # channels_redis's default
    if isinstance(hosts, (str, bytes, Mapping)) or not isinstance(hosts, Sequence):
        raise _fail(
            "You must pass a list of Redis hosts, even if there is only one: "
            "hosts=['redis://127.0.0.1:6379/0']"
        )
    decoded = [decode_host(host) for host in hosts]
    if len(decoded) > 1:
        # channels_redis shards over several hosts; membership here must live on one server,
        # so the first host serves everything (the system checks warn about it too).
        logger.warning(
            "channels_distrib: %d hosts given; all data lives on the first (%s). "
            "Give one host, or use Sentinel for failover.",
            len(decoded),
            decoded[0].address,
        )
    return decoded[0]


def compile_capacities(channel_capacity: Any) -> tuple[tuple[re.Pattern[str], int], ...]:
    """Validate ``channel_capacity`` (glob or compiled regex → capacity); compile globs once."""
    if channel_capacity is None:
        return ()
    if not isinstance(channel_capacity, Mapping):
        raise _fail(
            "channel_capacity must be a dict of glob → capacity, e.g. {'http.request': 200}"
        )
    compiled = []
    for pattern, value in channel_capacity.items():
        capacity = _int(f"channel_capacity[{pattern!r}]", value, minimum=1)
        if hasattr(pattern, "match"):
            compiled.append((pattern, capacity))  # a precompiled regex, as channels allows
        elif isinstance(pattern, str) and pattern:
            compiled.append((re.compile(fnmatch.translate(pattern)), capacity))
        else:
            raise _fail(
                f"channel_capacity key {pattern!r} must be a glob string or a compiled regex, "
                "e.g. {'websocket.send*': 20}"
            )
    return tuple(compiled)


def decode_broker(broker: Any) -> str | None:
    """Check the ``broker`` option: None, or an ``amqp://`` / ``amqps://`` URL aiormq can use
    as written (see :mod:`channels_distrib.amqp_url`; never echoed back with its password)."""
    if broker is None:
        return None
    if not isinstance(broker, str):
        raise _fail(
            f"broker must be an 'amqp://' or 'amqps://' URL; got {redact(broker)!r}. "
            "Write e.g. broker='amqp://user:password@127.0.0.1:5672/%2F'"
        )
    try:
        return check_broker_url(broker)
    except BadBrokerURL as exc:
        raise _fail(f"{exc}. {EXAMPLE}") from None


def build_config(
    *,
    hosts: Any,
    prefix: Any,
    expiry: Any,
    group_expiry: Any,
    capacity: Any,
    channel_capacity: Any,
    symmetric_encryption_keys: Any,
    serializer_format: Any,
    random_prefix_length: Any,
    node_id: Any,
    heartbeat_interval: Any,
    node_timeout: Any,
    serializer: Any,
    max_message_size: Any,
    max_meta_size: Any,
    retry_timeout: Any,
    connection_limit: Any,
    presence_interval: Any = 0.1,
    broker: Any = None,
    broker_persistent: Any = False,
) -> LayerConfig:
    """Check every option and their combinations; raise ``ImproperlyConfigured`` on the first mistake."""
    if not isinstance(prefix, str) or not PREFIX_RE.match(prefix):
        raise _fail(
            f"prefix must be 1-64 characters of letters, digits, '_', '.', ':' or '-'; got {prefix!r}. "
            "Write e.g. prefix='asgi'"
        )
    _int("random_prefix_length", random_prefix_length, minimum=0)
    heartbeat = _number("heartbeat_interval", heartbeat_interval)
    timeout = _number("node_timeout", node_timeout)
    if timeout <= heartbeat:
        raise _fail(
            f"node_timeout ({timeout:g} s) must be longer than heartbeat_interval ({heartbeat:g} s), "
            f"or live nodes get pruned; write e.g. node_timeout={heartbeat * 3:g}"
        )
    if serializer_format is not None and serializer is not None and serializer_format != serializer:
        raise _fail(
            f"serializer={serializer!r} and serializer_format={serializer_format!r} disagree; give one"
        )
    chosen = serializer if serializer is not None else (serializer_format or "msgpack")
    if not isinstance(chosen, str) or not chosen:
        raise _fail(f"serializer must be 'msgpack', 'json' or a dotted path; got {chosen!r}")
    keys: tuple[str, ...] = ()
    if symmetric_encryption_keys is not None:
        if isinstance(symmetric_encryption_keys, (str, bytes)) or not isinstance(
            symmetric_encryption_keys, Sequence
        ):
            raise _fail("symmetric_encryption_keys must be a list of strings, e.g. [SECRET_KEY]")
        if not symmetric_encryption_keys or not all(
            isinstance(key, str) and key for key in symmetric_encryption_keys
        ):
            raise _fail("symmetric_encryption_keys must be a non-empty list of non-empty strings")
        keys = tuple(symmetric_encryption_keys)
    if node_id is not None and (not isinstance(node_id, str) or not NODE_ID_RE.match(node_id)):
        raise _fail(
            f"node_id must be 1-100 characters of letters, digits, '_', '.', ':' or '-'; got {node_id!r}"
        )
    max_message = _int("max_message_size", max_message_size, minimum=1)
    if max_message < MIN_MESSAGE_SIZE:
        raise _fail(
            f"max_message_size must be at least {MIN_MESSAGE_SIZE} bytes (1 MiB); got {max_message}"
        )
    if connection_limit is not None:
        connection_limit = _int("connection_limit", connection_limit, minimum=1)
    if not isinstance(broker_persistent, bool):
        raise _fail(f"broker_persistent must be True or False; got {broker_persistent!r}")
    if broker_persistent and broker is None:
        raise _fail("broker_persistent=True needs broker (an amqp:// URL); add it or drop this option")
    return LayerConfig(
        host=decode_hosts(hosts),
        prefix=prefix,
        expiry=_number("expiry", expiry),
        group_expiry=_number("group_expiry", group_expiry),
        capacity=_int("capacity", capacity, minimum=1),
        channel_capacity=compile_capacities(channel_capacity),
        serializer=chosen,
        symmetric_encryption_keys=keys,
        node_id=node_id,
        heartbeat_interval=heartbeat,
        node_timeout=timeout,
        max_message_size=max_message,
        max_meta_size=_int("max_meta_size", max_meta_size, minimum=64),
        retry_timeout=_number("retry_timeout", retry_timeout, minimum=0.0, strict=False),
        connection_limit=connection_limit,
        presence_interval=_number(
            "presence_interval", presence_interval, minimum=0.0, strict=False
        ),
        broker=decode_broker(broker),
        broker_persistent=broker_persistent,
    )
