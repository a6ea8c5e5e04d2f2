"""channels-redis 4.3.0's and channels 4.3.2's generic layer tests, run against our layer.

Issue 8 lists the upstream tests that must pass unchanged apart from the import; each is one
item here, so a failure names its test. The files come from the sdists at test time (see
tests/upstream.py) and each runs once, in a pytest subprocess, for all its items. Marked
``upstream`` (not in the default run: it needs the package index): ``./runtests -m upstream``.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import upstream

pytestmark = [
    pytest.mark.upstream,
    # Two sdist downloads (first run only) and one subprocess per file fit in this.
    pytest.mark.timeout(2 * upstream.DOWNLOAD_TIMEOUT + upstream.RUN_TIMEOUT + 60),
]

# Upstream tests that fail against today's library, each with what goes wrong. Strict: one
# that starts passing fails here until its entry is removed.
KNOWN_FAILURES: dict[str, str] = {
    "channels_redis.test_core.test_message_expiry__group_send": (
        "issue 8, the idle rule: the channel has no receive pending for longer than expiry "
        "and one expired message, so housekeeping deletes it with its unexpired messages and "
        "drops its membership; Second! never arrives and receive() waits until the 10 s timeout"
    ),
}

# Most upstream tests leave their layer unclosed (channels_redis's fixtures flush but never
# close); on Python 3.10 and 3.11, in some runs, pytest-asyncio's loop teardown then waits
# forever for the cancelled inbox reader (issue 8: "A cancelled node task can refuse to end"),
# which pytest-timeout ends after 10 s. Seen: the reader was cancelled while redis-py opened
# its connection, asyncio.wait_for (around redis-py's socket write; before 3.12 it returns the
# inner result when that finished as the cancel landed) swallowed the cancellation, and the
# reader went back to XREAD with its node not stopped. Which tests hang changes from run to
# run, so this is no strict xfail marker: while True, a test that passed and whose one error
# is that teardown timeout is reported as xfailed; any other failure fails. Set it False once
# the library is fixed.
TOLERATE_TEARDOWN_HANG = True


class Runs:
    """Runs each upstream file at most once per session, on its own prefix."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url
        self.results: dict[str, dict[str, upstream.Outcome] | upstream.Unavailable] = {}
        self.prefixes: list[str] = []

    def outcome(self, spec: upstream.UpstreamFile, name: str) -> upstream.Outcome:
        if spec.key not in self.results:
            prefix = upstream.new_prefix()
            self.prefixes.append(prefix)
            try:
                self.results[spec.key] = upstream.run_file(spec, self.redis_url, prefix)
            except upstream.Unavailable as exc:
                self.results[spec.key] = exc
        result = self.results[spec.key]
        if isinstance(result, upstream.Unavailable):
            pytest.skip(f"{spec.key}: {result}")
        return result[name]

    def clean(self) -> None:
        for prefix in self.prefixes:
            upstream.flush_prefix(self.redis_url, prefix)


@pytest.fixture(scope="session")
def upstream_runs(redis_url: str) -> Iterator[Runs]:
    runs = Runs(redis_url)
    yield runs
    runs.clean()


def _test_id(spec: upstream.UpstreamFile, name: str) -> str:
    project, module = spec.key.removesuffix(".py").split("/")
    return f"{project}.{module}.{name}"


def _params() -> Iterator[object]:
    for spec in upstream.FILES:
        for name in spec.tests:
            test_id = _test_id(spec, name)
            marks = []
            if test_id in KNOWN_FAILURES:
                marks.append(pytest.mark.xfail(strict=True, reason=KNOWN_FAILURES[test_id]))
            yield pytest.param(spec, name, id=test_id, marks=marks)


@pytest.mark.parametrize(("spec", "name"), list(_params()))
def test_upstream(upstream_runs: Runs, spec: upstream.UpstreamFile, name: str) -> None:
    outcome = upstream_runs.outcome(spec, name)
    if outcome.teardown_hang and TOLERATE_TEARDOWN_HANG:
        pytest.xfail(
            "known (issue 8): the test passed, then its unclosed layer's inbox reader refused to end at loop teardown"
        )
    if not outcome.passed:
        pytest.fail(
            f"{spec.key}::{name} did not pass against DistributedChannelLayer:\n{outcome.detail}"
        )
