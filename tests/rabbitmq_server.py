"""A private, throwaway RabbitMQ for the tests that restart the broker (the machine's one on
5672 is shared and never touched): ``rabbitmq-server`` with its own node name, port, data and
log directories, started in a session of its own and stopped by that pid's process group.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

from tests.conftest import amqp_answers
from tests.helpers_layers import url_host_port


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RabbitProcess:
    """One private broker; :meth:`restart` stops it (its queues are not durable: gone) and
    starts it again on the same port."""

    def __init__(self, *, tls: bool = False) -> None:
        self.dir = tempfile.mkdtemp(prefix="rmq-test-")
        self.port = _free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        self.proc: subprocess.Popen[bytes] | None = None
        self.node = f"rmqtest{self.port}@localhost"
        self.tls_port = _free_port() if tls else None
        with open(os.path.join(self.dir, "rabbitmq.conf"), "w") as conf:
            conf.write(f"listeners.tcp.default = 127.0.0.1:{self.port}\n")
            if tls:
                conf.write(self._tls_conf())
        with open(os.path.join(self.dir, "plugins"), "w") as plugins:
            plugins.write("[].\n")
        os.chmod(self.dir, 0o777)

    def _tls_conf(self) -> str:
        """A throwaway CA and a server certificate for 127.0.0.1 made with openssl (plus an
        unrelated CA, ``wrong-ca.pem``), and the rabbitmq.conf lines of a TLS listener."""
        if shutil.which("openssl") is None:
            pytest.skip("openssl not on PATH (needed to make the test's CA and certificate)")

        def openssl(*args: str) -> None:
            subprocess.run(["openssl", *args], cwd=self.dir, check=True, capture_output=True, timeout=60)

        for name in ("ca", "wrong-ca"):
            openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN=test {name}")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key",
                "-out", "server.csr", "-subj", "/CN=127.0.0.1")
        with open(os.path.join(self.dir, "san.ext"), "w") as ext:
            ext.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
        openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                "-CAcreateserial", "-days", "2", "-extfile", "san.ext", "-out", "server.pem")
        for name in os.listdir(self.dir):
            os.chmod(os.path.join(self.dir, name), 0o644)  # the server runs as user rabbitmq
        path = functools.partial(os.path.join, self.dir)
        return (
            f"listeners.ssl.default = 127.0.0.1:{self.tls_port}\n"
            f"ssl_options.cacertfile = {path('ca.pem')}\n"
            f"ssl_options.certfile = {path('server.pem')}\n"
            f"ssl_options.keyfile = {path('server.key')}\n"
            "ssl_options.verify = verify_none\n"
            "ssl_options.fail_if_no_peer_cert = false\n"
        )

    def tls_url(self, ca: str = "ca.pem") -> str:
        """An ``amqps://`` URL of the TLS listener that trusts ``ca`` (``cafile=``)."""
        return f"amqps://guest:guest@127.0.0.1:{self.tls_port}/?cafile={os.path.join(self.dir, ca)}"

    def start(self, timeout: float = 60.0) -> None:
        env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_CONFIG_FILE": os.path.join(self.dir, "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": os.path.join(self.dir, "advanced.config"),
            "RABBITMQ_DIST_PORT": str(_free_port()),
            "RABBITMQ_MNESIA_BASE": os.path.join(self.dir, "mnesia"),
            "RABBITMQ_FEATURE_FLAGS_FILE": os.path.join(self.dir, "feature_flags"),
            "RABBITMQ_LOG_BASE": os.path.join(self.dir, "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(self.dir, "plugins"),
            "RABBITMQ_PID_FILE": os.path.join(self.dir, "pid"),
        }
        self.log = open(os.path.join(self.dir, "out.log"), "ab")  # noqa: SIM115 (stop closes)
        self.proc = subprocess.Popen(
            ["rabbitmq-server"], env=env, stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not amqp_answers(self.url, 0.5) or self._server_pid() is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"private rabbitmq-server did not start; see {self.dir}/out.log")
            time.sleep(0.2)

    def _server_pid(self) -> int | None:
        """The Erlang VM's pid, from RABBITMQ_PID_FILE (the start script hands the server
        to the rabbitmq user in a session of its own, out of reach of our process group)."""
        with contextlib.suppress(OSError, ValueError), open(os.path.join(self.dir, "pid")) as file:
            return int(file.read().strip())
        return None

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        pid = self._server_pid()
        for target in (pid, proc.pid):  # the server this test started, by pid; its script
            if target is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(target, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while amqp_answers(self.url, 0.2) and time.monotonic() < deadline:
            time.sleep(0.1)
        with contextlib.suppress(Exception):
            self.log.close()

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def private_rabbitmq(*, tls: bool = False) -> Iterator[RabbitProcess]:
    """A private broker (with ``tls``, also a TLS listener: :meth:`RabbitProcess.tls_url`)."""
    if shutil.which("rabbitmq-server") is None:
        pytest.skip("rabbitmq-server not on PATH (needed for a private broker to restart)")
    broker = RabbitProcess(tls=tls)
    try:
        broker.start()
        yield broker
    finally:
        broker.cleanup()


__all__ = ["RabbitProcess", "private_rabbitmq", "url_host_port"]
