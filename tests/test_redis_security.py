"""Access to Redis: a password, a least-privilege ACL user, TLS with client certificates, and
what ``symmetric_encryption_keys`` leaves in Redis (issue 12, "Security of Redis access").

Every test starts its own servers on free loopback ports, so passwords and users set here never
reach the shared Redis of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from channels_distrib.exceptions import RedisUnavailable
from tests.helpers_layers import eventually, key_values, msg, nothing_arrives, own_layer, recv
from tests.redis_server import RedisProcess, free_port, server_binary, start_server

pytestmark = pytest.mark.timeout(90)

PASSWORD = "pw-" + uuid.uuid4().hex

# The least a layer's ACL user needs (found from INFO commandstats of a full run: connect,
# send/receive on every kind of channel, group_add/discard, group_send, heartbeats, node_stats,
# prune, flush, close). Commands run by the layer's Lua scripts are checked too. Removing any
# one of them makes this test fail, except hello/ping (redis-py's handshake and health checks)
# and del/zrem/multi/exec (the layer sends them on paths this test does not reach).
ACL_COMMANDS = (
    # connection setup and health
    "hello", "ping", "client|setname", "client|id",
    # the scripts, and what they call
    "evalsha", "script|load", "time",
    "exists", "get", "set", "del", "unlink", "pexpire", "pttl", "scan",
    "hget", "hset", "hdel", "hexists", "hgetall", "hkeys", "hincrby",
    "rpush", "rpop", "llen", "lindex", "blmove",
    "sadd", "sismember",
    "zadd", "zrem", "zscore", "zcount", "zrange", "zrangebyscore",
    "xadd", "xread", "xrange", "xrevrange", "xtrim",
    "multi", "exec",
    # the inbox doorbell (channels_distrib.doorbell), on the prefix's channels (&<prefix>:*)
    "subscribe", "publish",
)


async def _admin(server: RedisProcess, password: str | None = None) -> aioredis.Redis:
    return aioredis.Redis(host="127.0.0.1", port=server.port, password=password)


@contextlib.asynccontextmanager
async def _server(*extra: str) -> AsyncIterator[RedisProcess]:
    server = await asyncio.to_thread(start_server, list(extra))
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


async def _round_trip(prefix: str, **config: Any) -> None:
    """send/receive on a named and a local channel, group_send, through two layers."""
    async with own_layer(prefix=prefix, **config) as node, \
            own_layer(prefix=prefix, _flush=False, **config) as sender:
        local = await node.new_channel()
        await node.group_add("secgroup", local)
        await node.group_add("secgroup", "sec.named")
        await sender.send("sec.named", msg(1))
        await sender.send(local, msg(2))
        await sender.group_send("secgroup", msg(3))
        assert await recv(node, "sec.named") == msg(1)
        assert await recv(node, local) == msg(2)
        assert await recv(node, local) == msg(3)
        assert await recv(node, "sec.named") == msg(3)
        await node.group_discard("secgroup", local)
        await sender.group_send("secgroup", msg(4))
        assert await recv(node, "sec.named") == msg(4)
        assert await nothing_arrives(node, local)


# ------------------------------------------------------------------ requirepass


async def test_password_in_url_and_in_dict_hosts(prefix):
    async with _server() as server:
        admin = await _admin(server)
        await admin.config_set("requirepass", PASSWORD)
        await admin.aclose()
        await _round_trip(prefix + "u", hosts=[f"redis://:{PASSWORD}@127.0.0.1:{server.port}/0"])
        await _round_trip(prefix + "a", hosts=[{"address": f"redis://127.0.0.1:{server.port}/0",
                                                "password": PASSWORD}])
        await _round_trip(prefix + "h", hosts=[{"host": "127.0.0.1", "port": server.port,
                                                "password": PASSWORD}])


@pytest.mark.parametrize("form", ["url", "dict"])
async def test_wrong_password_fails_clearly_without_the_password(prefix, caplog, form):
    wrong = "wrong-" + uuid.uuid4().hex
    async with _server() as server:
        admin = await _admin(server)
        await admin.config_set("requirepass", PASSWORD)
        await admin.aclose()
        host: Any = (f"redis://:{wrong}@127.0.0.1:{server.port}/0" if form == "url"
                     else {"host": "127.0.0.1", "port": server.port, "password": wrong})
        caplog.set_level(logging.DEBUG)
        # A rejected password is not retried for retry_timeout (it cannot get better): the
        # send fails at once, well inside the 20 s it would otherwise keep trying.
        async with own_layer(hosts=[host], prefix=prefix, retry_timeout=20, _flush=False) as layer:
            started = time.monotonic()
            with pytest.raises(RedisUnavailable) as info:
                await asyncio.wait_for(layer.send("sec.named", msg(1)), 30)
            assert time.monotonic() - started < 3.0
        text = str(info.value)
        assert "password" in text.lower(), text  # says what is wrong...
        seen = [text, repr(info.value), caplog.text]
        cause: BaseException | None = info.value
        while cause is not None:
            seen += [str(cause), repr(cause)]
            cause = cause.__cause__ or cause.__context__
        for shown in seen:  # ...and never shows the password
            assert wrong not in shown, shown
            assert PASSWORD not in shown, shown


# ------------------------------------------------------------------ ACL user


async def test_acl_user_with_the_minimal_commands_works_end_to_end(prefix, caplog):
    user = "distrib-" + uuid.uuid4().hex[:8]
    caplog.set_level(logging.WARNING)
    async with _server() as server:
        admin = await _admin(server)
        # One key pattern per prefix used below, as the README writes it: ~<prefix>:*
        rules = ["on", f">{PASSWORD}", "resetkeys", f"~{prefix}r:*", f"~{prefix}d:*", f"~{prefix}b:*",
                 "resetchannels", f"&{prefix}r:*", f"&{prefix}d:*", f"&{prefix}b:*", "-@all", *(f"+{c}" for c in ACL_COMMANDS)]
        await admin.execute_command("ACL", "SETUSER", user, "reset", *rules)
        url = f"redis://{user}:{PASSWORD}@127.0.0.1:{server.port}/0"
        # The user really is restricted: other keys and other commands are refused.
        limited = aioredis.Redis.from_url(url)
        with pytest.raises(aioredis.ResponseError, match="no permissions"):
            await limited.set("outside-the-prefix", "x")
        with pytest.raises(aioredis.ResponseError, match="no permissions"):
            await limited.flushall()
        await limited.aclose()

        await _round_trip(prefix + "r", hosts=[url])
        await _round_trip(prefix + "d", hosts=[{"host": "127.0.0.1", "port": server.port,
                                                "username": user, "password": PASSWORD}])
        fast = {"hosts": [url], "heartbeat_interval": 0.2, "node_timeout": 1.0}
        async with own_layer(prefix=prefix + "b", **fast) as node, \
                own_layer(prefix=prefix + "b", **fast) as watcher:
            await node.new_channel()  # registers the node; its heartbeat runs from here
            await watcher.new_channel()

            async def beats() -> list[float]:
                return [s.at for s in await watcher.node_stats() if s.node_id == node.node_id]

            assert await eventually(lambda: _truthy(beats()), timeout=10), "no heartbeat seen"
            first = (await beats())[0]
            assert await eventually(lambda: _later(beats(), first), timeout=10), \
                "the node's heartbeat did not advance"
            assert await watcher.prune() == []
        await admin.aclose()
    refused = [r for r in caplog.records if "no permissions" in _record_text(r).lower()
               or "noperm" in _record_text(r).lower()]
    assert not refused, [r.getMessage() for r in refused]


async def test_acl_user_without_channels_falls_back_to_blocking_reads(prefix, caplog):
    """The rules of earlier versions (no pub/sub channels): every message still arrives; the
    inbox readers wait in XREAD BLOCK instead of for their doorbells, and say so once."""
    user = "distrib-" + uuid.uuid4().hex[:8]
    caplog.set_level(logging.WARNING)
    commands = [c for c in ACL_COMMANDS if c not in ("subscribe", "publish")]
    async with _server() as server:
        admin = await _admin(server)
        rules = ["on", f">{PASSWORD}", "resetkeys", f"~{prefix}r:*", "resetchannels", "-@all",
                 *(f"+{c}" for c in commands)]
        await admin.execute_command("ACL", "SETUSER", user, "reset", *rules)
        await _round_trip(prefix + "r", hosts=[f"redis://{user}:{PASSWORD}@127.0.0.1:{server.port}/0"])
        await admin.aclose()
    refused = [r for r in caplog.records if "doorbell refused" in r.getMessage()]
    assert refused, [r.getMessage() for r in caplog.records]


async def _truthy(values: Any) -> bool:
    return bool(await values)


async def _later(values: Any, first: float) -> bool:
    got = await values
    return bool(got) and got[0] > first


def _record_text(record: logging.LogRecord) -> str:
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        text += " " + repr(record.exc_info[1])
    return text


# ------------------------------------------------------------------ TLS with client certificates


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_certs(directory: Path) -> None:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all by openssl."""
    # Python 3.13 verifies strictly (VERIFY_X509_STRICT): the CA needs its key usage.
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=test-ca",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-keyout", "ca.key", "-out", "ca.crt", cwd=directory)
    (directory / "server.ext").write_text(
        "subjectAltName=IP:127.0.0.1\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    (directory / "client.ext").write_text(
        "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n"
    )
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", ["-extfile", "client.ext"])):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=directory)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
                 "-CAcreateserial", "-days", "1", "-out", f"{name}.crt", *ext, cwd=directory)


@contextlib.asynccontextmanager
async def _tls_server(directory: Path, *, client_auth: bool) -> AsyncIterator[str]:
    """A redis-server on a TLS-only port with the certificates of :func:`_make_certs`;
    yields its ``rediss://`` address. Skips when this redis-server was built without TLS."""
    binary = server_binary()
    assert binary, "no redis-server"
    await asyncio.to_thread(_make_certs, directory)
    d = str(directory)
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
         "--tls-cert-file", f"{d}/server.crt", "--tls-key-file", f"{d}/server.key",
         "--tls-ca-cert-file", f"{d}/ca.crt",
         "--tls-auth-clients", "yes" if client_auth else "no",
         "--save", "", "--appendonly", "no", "--dir", d],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            if proc.poll() is not None:
                pytest.skip(f"{binary} cannot serve TLS here (exit {proc.returncode})")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "TLS server did not start"
                await asyncio.sleep(0.05)
        yield f"rediss://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 10)


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl binary")
async def test_rediss_verifying_the_server_certificate(tmp_path, prefix):
    async with _tls_server(tmp_path, client_auth=False) as address:
        ca = f"{tmp_path}/ca.crt"
        await _round_trip(prefix + "u", hosts=[f"{address}?ssl_ca_certs={ca}"])
        await _round_trip(prefix + "d", hosts=[{"address": address, "ssl_ca_certs": ca}])


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl binary")
async def test_rediss_with_client_certificates(tmp_path, prefix):
    async with _tls_server(tmp_path, client_auth=True) as address:
        d = str(tmp_path)
        await _round_trip(prefix + "d", hosts=[{
            "address": address, "ssl_ca_certs": f"{d}/ca.crt",
            "ssl_certfile": f"{d}/client.crt", "ssl_keyfile": f"{d}/client.key"}])
        await _round_trip(prefix + "u", hosts=[
            f"{address}?ssl_ca_certs={d}/ca.crt&ssl_certfile={d}/client.crt"
            f"&ssl_keyfile={d}/client.key"])
        # Without a client certificate the server refuses the connection.
        async with own_layer(hosts=[{"address": address, "ssl_ca_certs": f"{d}/ca.crt"}],
                             prefix=prefix + "n", retry_timeout=1, _flush=False) as layer:
            # TLS 1.3: the refusal comes as an alert on the first read, after the request went.
            with pytest.raises((RedisUnavailable, RedisConnectionError)):
                await asyncio.wait_for(layer.send("sec.named", msg(1)), 30)


# ------------------------------------------------------------------ encryption at rest


async def _payload_dumps(server: RedisProcess, prefix: str, marker: bytes,
                         keys: list[str] | None) -> dict[bytes, bytes]:
    """Send a marked message to a named channel, a local channel and a group; read every key
    of the prefix back raw (DUMP, and each value as stored) before anything is received."""
    async with own_layer(hosts=[server.url], prefix=prefix, symmetric_encryption_keys=keys) as node:
        local = await node.new_channel()
        await node.group_add("secretgroup", local)
        await node.group_add("secretgroup", "secret.groupq")
        await node.send("secret.named", {"type": "chat.message", "text": marker.decode()})
        await node.send(local, {"type": "chat.message", "text": marker.decode()})
        await node.group_send("secretgroup", {"type": "chat.message", "text": marker.decode()})
        admin = await _admin(server)
        try:
            dumps = {key: (await admin.dump(key) or b"") + b"".join(await key_values(admin, key))
                     async for key in admin.scan_iter(match=f"{prefix}*", count=1000)}
        finally:
            await admin.aclose()
        # The messages were really stored: they still arrive, decrypted.
        for channel in ("secret.named", local, local, "secret.groupq"):
            assert (await recv(node, channel))["text"] == marker.decode()
        return dumps


async def test_encrypted_payloads_leave_no_plaintext_in_redis(prefix):
    # No LZF in DUMP, so a plaintext marker would show as its own bytes.
    async with _server("--rdbcompression", "no") as server:
        marker = ("MARK-" + uuid.uuid4().hex).encode()
        dumps = await _payload_dumps(server, prefix + "e", marker, ["k-one", "k-two"])
        assert dumps, "nothing was written under the prefix"
        assert [k for k, v in dumps.items() if marker in v] == []
        # Control: the same scan finds the marker in the queues and the inbox when unencrypted
        # , so the check above can fail.
        plain = await _payload_dumps(server, prefix + "p", marker, None)
        assert len([k for k, v in plain.items() if marker in v]) >= 2
