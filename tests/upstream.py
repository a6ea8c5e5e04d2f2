"""Run channels-redis's and channels' own generic layer tests against DistributedChannelLayer.

The upstream test files are taken from the released sdists at test time (``pip download
--no-binary :all:``, cached under ``.pytest-upstream/`` or ``$XDG_CACHE_HOME``) and never kept
in this repository. Only their imports (and the ``TEST_HOSTS`` constant) are rewritten so
that they build our layer on the test Redis under a prefix of their own; one rewrite drops a
peek at ``InMemoryChannelLayer``'s private dict, as issue 8 allows. Each file then runs in a
pytest subprocess with the settings its project uses (``asyncio_mode = auto``, a 10 s
per-test timeout) and the JUnit XML says what happened to every test.

channels' sdists ship no ``tests/`` (its MANIFEST.in excludes them), so its tests run only
when ``CHANNELS_DISTRIB_CHANNELS_SOURCE`` names a channels source tree; else they skip.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

from channels_distrib.layers import DistributedChannelLayer

REPO = Path(__file__).resolve().parent.parent

# Set to the root of a channels source tree (a checkout of the 4.3.2 tag) to run channels'
# tests: its sdists ship no tests/ (MANIFEST.in says `recursive-exclude tests *`).
CHANNELS_SOURCE_ENV = "CHANNELS_DISTRIB_CHANNELS_SOURCE"

DOWNLOAD_TIMEOUT = 300.0
# Per file: the slowest upstream file runs about a minute, plus 10 s per test that times out.
RUN_TIMEOUT = 420.0

# Output of pip that means the index could not be reached at all (as opposed to a refusal).
_OFFLINE = re.compile(
    r"NewConnectionError|ConnectTimeoutError|ReadTimeoutError|Network is unreachable"
    r"|Temporary failure in name resolution|Name or service not known|Connection refused"
    r"|No route to host|ProxyError|Max retries exceeded",
)

_SHIM = '''\
"""Written by tests/upstream.py: the upstream tests' layer names, bound to DistributedChannelLayer."""

from __future__ import annotations

import functools
import os

from channels.exceptions import ChannelFull

from channels_distrib.layers import DistributedChannelLayer

__all__ = ["ChannelFull", "RedisChannelLayer", "TEST_HOSTS", "_close_redis"]

TEST_HOSTS = [os.environ["CHANNELS_DISTRIB_UPSTREAM_REDIS"]]

# Every layer a test builds, with or without hosts, uses the test Redis and this run's prefix.
RedisChannelLayer = functools.partial(
    DistributedChannelLayer,
    hosts=TEST_HOSTS,
    prefix=os.environ["CHANNELS_DISTRIB_UPSTREAM_PREFIX"],
)


async def _close_redis(connection: object) -> None:
    raise NotImplementedError("channels_redis.utils._close_redis: a channels_redis internal")
'''

_INI = """\
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
timeout = 10
"""


@dataclass(frozen=True)
class Rewrite:
    """Replace ``old`` by ``new`` exactly ``count`` times (inside ``within``, a function, if set)."""

    old: str
    new: str
    count: int = 1
    within: str | None = None


@dataclass(frozen=True)
class UpstreamFile:
    """One upstream test file: where it comes from, how it is rewritten, which tests must pass."""

    key: str  # "<project>/<file>", the first part of our test ids
    package: str  # pip requirement name
    version: str
    member: str  # path inside the sdist, after its top directory
    rewrites: tuple[Rewrite, ...]
    tests: tuple[str, ...]
    leak_checked: tuple[str, ...] = ()  # run alone, failing on a leaked connection or task

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


_HOSTS_LINE = Rewrite(
    'TEST_HOSTS = ["redis://localhost:6379"]',
    "from _distrib_shim import TEST_HOSTS  # rewritten: the test Redis",
)

FILES: tuple[UpstreamFile, ...] = (
    UpstreamFile(
        key="channels_redis/test_core.py",
        package="channels-redis",
        version="4.3.0",
        member="tests/test_core.py",
        rewrites=(
            Rewrite(
                "from channels_redis.core import ChannelFull, RedisChannelLayer",
                "from _distrib_shim import ChannelFull, RedisChannelLayer  # rewritten",
            ),
            _HOSTS_LINE,
        ),
        tests=(
            "test_send_receive",
            "test_send_capacity",
            "test_send_specific_capacity",
            "test_process_local_send_receive",
            "test_multi_send_receive",
            "test_reject_bad_channel",
            "test_groups_basic",
            "test_groups_channel_full",
            "test_groups_same_prefix",
            "test_repeated_group_send_with_async_to_sync",
            "test_receive_cancel",
            "test_random_reset__channel_name",
            "test_message_expiry__earliest_message_expires",
            "test_message_expiry__all_messages_under_expiration_time",
            "test_message_expiry__group_send",
        ),
    ),
    UpstreamFile(
        key="channels_redis/test_pubsub.py",
        package="channels-redis",
        version="4.3.0",
        member="tests/test_pubsub.py",
        rewrites=(
            Rewrite(
                "from channels_redis.pubsub import RedisPubSubChannelLayer",
                "from _distrib_shim import RedisChannelLayer as RedisPubSubChannelLayer  # rewritten",
            ),
            # Only test_auto_reconnect (not in our list) uses it.
            Rewrite(
                "from channels_redis.utils import _close_redis",
                "from _distrib_shim import _close_redis  # rewritten",
            ),
            _HOSTS_LINE,
        ),
        tests=(
            "test_layer_close",
            "test_send_receive",
            "test_send_receive_sync",
            "test_multi_send_receive",
            "test_multi_send_receive_sync",
            "test_groups_basic",
            "test_groups_same_prefix",
            "test_random_reset__channel_name",
            "test_proxied_methods_coroutine_check",
            "test_receive_hang",
            "test_discard_before_add",
        ),
        # Its docstring: a layer that does not close properly shows at process exit.
        leak_checked=("test_layer_close",),
    ),
    UpstreamFile(
        key="channels/test_inmemorychannel.py",
        package="channels",
        version="4.3.2",
        member="tests/test_inmemorychannel.py",
        rewrites=(
            Rewrite(
                "from channels.layers import InMemoryChannelLayer",
                "from _distrib_shim import RedisChannelLayer as InMemoryChannelLayer  # rewritten",
            ),
            # Issue 8 sets this peek aside: a Redis layer has no in-memory channel dict.
            Rewrite(
                "    assert len(channel_layer.channels) == 0\n",
                "    # rewritten: `assert len(channel_layer.channels) == 0` peeked at\n"
                "    # InMemoryChannelLayer's private dict, which a Redis layer does not have.\n",
                within="test_expiry_multi",
            ),
        ),
        tests=(
            "test_send_capacity",
            "test_process_local_send_receive",
            "test_multi_send_receive",
            "test_groups_basic",
            "test_groups_channel_full",
            "test_expiry_multi",
        ),
    ),
)


class Unavailable(Exception):
    """The upstream source cannot be had here (index unreachable, or no tests in the sdist)."""


@dataclass(frozen=True)
class Outcome:
    """What happened to one upstream test: ``passed`` only when it ran and nothing went wrong."""

    passed: bool
    detail: str


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/channels_distrib/upstream`` when set, else ``.pytest-upstream/``."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg) / "channels_distrib" / "upstream"
    return REPO / ".pytest-upstream"


def sdist(package: str, version: str) -> Path:
    """The sdist of ``package==version``, downloaded into the cache once and reused after."""
    cache = cache_dir()
    stem = f"{package.replace('-', '_')}-{version}"
    for name in (f"{stem}.tar.gz", f"{package}-{version}.tar.gz"):
        if (cache / name).is_file():
            return cache / name
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as scratch:
        command = [
            sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
            "--disable-pip-version-check", "--retries", "1", "--timeout", "20",
            "-d", scratch, f"{package}=={version}",
        ]  # fmt: skip
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise Unavailable(f"pip download {package}=={version} timed out") from exc
        output = done.stdout + done.stderr
        if done.returncode != 0:
            if _OFFLINE.search(output):
                raise Unavailable(
                    f"package index unreachable for {package}=={version}: {output[-600:]}"
                )
            raise RuntimeError(f"pip download {package}=={version} failed:\n{output}")
        found = sorted(Path(scratch).glob("*.tar.gz"))
        if len(found) != 1:
            raise RuntimeError(f"pip download {package}=={version} gave {found}:\n{output}")
        target = cache / found[0].name
        os.replace(found[0], target)  # atomic: a concurrent run sees all of it or none
        return target


def source_text(spec: UpstreamFile) -> tuple[str, str]:
    """The upstream file's text and where it came from."""
    archive = sdist(spec.package, spec.version)
    try:
        found = _read_member(archive, spec.member)
    except (tarfile.TarError, EOFError, OSError):  # a cached archive that is damaged
        archive.unlink()
        archive = sdist(spec.package, spec.version)
        found = _read_member(archive, spec.member)
    if found is not None:
        return found
    override = os.environ.get(CHANNELS_SOURCE_ENV) if spec.package == "channels" else None
    if override:
        path = Path(override) / spec.member
        return path.read_text(), str(path)
    hint = (
        f"; set {CHANNELS_SOURCE_ENV} to a channels source tree"
        if spec.package == "channels"
        else ""
    )
    raise Unavailable(f"{archive.name} ships no {spec.member}{hint}")


def _read_member(archive: Path, member: str) -> tuple[str, str] | None:
    """Text of ``<top dir>/<member>`` in the sdist, and its name there; None if absent."""
    with tarfile.open(archive) as tar:
        for info in tar.getmembers():
            if info.name.partition("/")[2] == member and info.isfile():
                handle = tar.extractfile(info)
                if handle is not None:
                    return handle.read().decode(), f"{archive.name}:{info.name}"
    return None


def rewrite(text: str, spec: UpstreamFile) -> str:
    """Apply the file's rewrites; each must match exactly as often as expected."""
    for change in spec.rewrites:
        start, end = 0, len(text)
        if change.within is not None:
            match = re.search(rf"^(async )?def {change.within}\(.*?(?=^\S|\Z)", text, re.M | re.S)
            if match is None:
                raise RuntimeError(f"{spec.key}: no function {change.within} to rewrite")
            start, end = match.span()
        found = text.count(change.old, start, end)
        if found != change.count:
            raise RuntimeError(
                f"{spec.key}: expected {change.count} of {change.old!r}, found {found}; "
                "the upstream file changed, update tests/upstream.py"
            )
        text = text[:start] + text[start:end].replace(change.old, change.new) + text[end:]
    return text


def run_file(spec: UpstreamFile, redis_url: str, prefix: str) -> dict[str, Outcome]:
    """Run the listed tests of one upstream file in pytest subprocesses; outcome per test.

    The tests in ``spec.leak_checked`` run alone, one subprocess each, where a leaked
    connection or task (a ResourceWarning that ends up unraisable at exit, or asyncio's
    "Task was destroyed but it is pending!") fails them even though pytest saw them pass.
    """
    text, origin = source_text(spec)
    with tempfile.TemporaryDirectory(prefix="upstream-") as work:
        root = Path(work)
        (root / "pytest.ini").write_text(_INI)
        (root / "_distrib_shim.py").write_text(_SHIM)
        (root / spec.filename).write_text(
            f"# From {origin}, rewritten by channels_distrib's tests/upstream.py.\n"
            + rewrite(text, spec)
        )
        env = dict(os.environ)
        env["CHANNELS_DISTRIB_UPSTREAM_REDIS"] = redis_url
        env["CHANNELS_DISTRIB_UPSTREAM_PREFIX"] = prefix
        env.pop("PYTEST_ADDOPTS", None)
        batch = tuple(name for name in spec.tests if name not in spec.leak_checked)
        outcomes, _, output = _pytest(root, spec, batch, env, [])
        logs = [output]
        for name in spec.leak_checked:
            found, returncode, output = _pytest(root, spec, (name,), env, _LEAK_CHECK)
            logs.append(output)
            if found[name].passed and (returncode != 0 or _DESTROYED in output):
                found[name] = Outcome(
                    False, f"passed, but left a connection or task behind:\n{output[-3000:]}"
                )
            outcomes.update(found)
        keep_log(spec, "\n".join(logs))
        return outcomes


# pytest turns a ResourceWarning raised in a destructor into this warning at exit.
_LEAK_CHECK = [
    "-W",
    "error::ResourceWarning",
    "-W",
    "error::pytest.PytestUnraisableExceptionWarning",
]
_DESTROYED = "Task was destroyed but it is pending"


def _pytest(
    root: Path, spec: UpstreamFile, names: tuple[str, ...], env: dict[str, str], extra: list[str]
) -> tuple[dict[str, Outcome], int | None, str]:
    """One pytest subprocess over ``names``: outcome per test, exit status, full output."""
    if not names:
        return {}, 0, ""
    report = root / "report.xml"
    report.unlink(missing_ok=True)
    command = [
        sys.executable, "-m", "pytest", "-c", str(root / "pytest.ini"),
        "--rootdir", str(root), "-p", "no:cacheprovider", "-p", "no:django",
        "--runxfail",  # a listed test that upstream marks xfail must pass here
        "-rA", f"--junitxml={report}", "-o", "junit_family=xunit1", *extra,
        *(f"{spec.filename}::{name}" for name in names),
    ]  # fmt: skip
    returncode: int | None = None
    try:
        done = subprocess.run(
            command, cwd=root, env=env, capture_output=True, text=True,
            timeout=RUN_TIMEOUT, check=False,
        )  # fmt: skip
        output, returncode = done.stdout + done.stderr, done.returncode
    except subprocess.TimeoutExpired as exc:
        output = _text(exc.stdout) + _text(exc.stderr)
        output += f"\n[subprocess killed after {RUN_TIMEOUT:.0f} s]"
    if not report.is_file():
        failed = Outcome(False, f"no JUnit report:\n{output[-3000:]}")
        return dict.fromkeys(names, failed), returncode, output
    return parse_report(report, names, output), returncode, output


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data if isinstance(data, str) else data.decode(errors="replace")


def keep_log(spec: UpstreamFile, output: str) -> None:
    """Leave the subprocess's full output in the cache directory for reading after a run."""
    logs = cache_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / spec.key.replace("/", "__").replace(".py", ".log")).write_text(output)


def parse_report(report: Path, tests: tuple[str, ...], output: str) -> dict[str, Outcome]:
    """Outcome per listed test; a test missing from the report (not collected) has failed."""
    seen: dict[str, list[ET.Element]] = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        problems = seen.setdefault(case.get("name", ""), [])
        problems.extend(child for child in case if child.tag in ("failure", "error", "skipped"))
    outcomes: dict[str, Outcome] = {}
    for name in tests:
        if name not in seen:
            outcomes[name] = Outcome(False, f"not collected or not run:\n{output[-2000:]}")
        elif seen[name]:
            detail = "\n".join(
                f"{p.tag}: {p.get('message', '')}\n{(p.text or '').strip()[-2500:]}"
                for p in seen[name]
            )
            outcomes[name] = Outcome(False, detail)
        else:
            outcomes[name] = Outcome(True, "passed")
    return outcomes


def flush_prefix(redis_url: str, prefix: str) -> None:
    """Remove what the upstream tests left under their prefix (layers they never closed)."""

    async def flush() -> None:
        layer = DistributedChannelLayer(hosts=[redis_url], prefix=prefix)
        try:
            await layer.flush()
        finally:
            await layer.close()

    asyncio.run(flush())


def new_prefix() -> str:
    return f"up{uuid.uuid4().hex[:10]}"
