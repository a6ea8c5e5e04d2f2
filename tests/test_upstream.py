"""channels-redis 4.3.0's and channels 4.3.2's generic layer tests, run against our layer.

Issue 8 lists the upstream tests that must pass unchanged apart from the import; each is one
item here, so a failure names its test. The files come from the sdists at test time (see
tests/upstream.py) and each runs once, in a pytest subprocess, for all its items (pubsub's
test_layer_close alone, so that a leaked connection or task fails it). Marked ``upstream``
(not in the default run: it needs the package index): ``./runtests -m upstream``.
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

# Upstream tests known to fail against the library: test id -> what goes wrong. Each is a
# strict xfail, so one that starts passing fails here until its entry is removed. A teardown
# that hangs (an unclosed layer's task that refuses to end, issue 8) fails its test through
# the upstream pytest-timeout of 10 s.
KNOWN_FAILURES: dict[str, str] = {}


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
    if not outcome.passed:
        pytest.fail(
            f"{spec.key}::{name} did not pass against DistributedChannelLayer:\n{outcome.detail}"
        )
