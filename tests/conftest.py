"""Shared fixtures: the provisioned stack, private containerd instances (1.6 and 2.1), test images."""

from __future__ import annotations

import sys
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

# `from harness import ...` in every test file, whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import images  # noqa: E402
from harness.containerd import CRI_NAMESPACE, Containerd  # noqa: E402
from harness.stack import VERSIONS, Stack, StackMissing, load_stack  # noqa: E402
from harness.s3server import S3Server  # noqa: E402

# The containerd instances a test started, so a failure report can carry their logs.
_INSTANCES = pytest.StashKey[list[Containerd]]()
# Lines of each containerd log attached to a failed test's report.
LOG_TAIL_LINES = 400

ContainerdFactory = Callable[..., Containerd]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    # Runs before the fixture teardown stops the daemons, so the logs are still complete.
    if report.failed and report.when in ("setup", "call"):
        for c in item.stash.get(_INSTANCES, []):
            tail = "\n".join(c.log_text().splitlines()[-LOG_TAIL_LINES:])
            report.sections.append((f"containerd {c.version} log ({c.log_path}, last {LOG_TAIL_LINES} lines)", tail))
    return report


@pytest.fixture(scope="session")
def stack() -> Stack:
    try:
        return load_stack()
    except StackMissing as e:
        pytest.fail(str(e), pytrace=False)


@pytest.fixture(scope="session")
def test_images(stack: Stack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, images.ImageTar]:
    """The image tars, built once per session: "busybox" and "pause"."""
    d = tmp_path_factory.mktemp("images")
    return {"busybox": images.busybox_image(d, stack.busybox), "pause": images.pause_image(d, stack.busybox)}


@pytest.fixture
def containerd_factory(
    request: pytest.FixtureRequest, stack: Stack, test_images: dict[str, images.ImageTar]
) -> Iterator[ContainerdFactory]:
    """start(version, *, extra_path=(), extra_config="", env=None, with_images=True) -> a running Containerd.

    With images, busybox is imported into the instance's ctr namespace and busybox + pause into CRI's
    k8s.io. Every instance is stopped at teardown, whatever the outcome.
    """
    started = request.node.stash.setdefault(_INSTANCES, [])

    def start(
        version: str,
        *,
        extra_path: Sequence[str | Path] = (),
        extra_config: str = "",
        env: Mapping[str, str] | None = None,
        with_images: bool = True,
        netns: str | None = None,
    ) -> Containerd:
        c = Containerd(stack, version, extra_path=extra_path, extra_config=extra_config, env=env, netns=netns)
        started.append(c)
        c.start()
        if with_images:
            images.import_image(c, test_images["busybox"])
            images.import_image(c, test_images["busybox"], namespace=CRI_NAMESPACE)
            images.import_image(c, test_images["pause"], namespace=CRI_NAMESPACE)
        return c

    yield start
    errors = []
    for c in reversed(started):
        try:
            c.stop()
        except Exception as e:  # stop the others all the same
            errors.append(f"{c!r}: {e!r}")
    if errors:
        pytest.fail("stopping containerd failed: " + "; ".join(errors), pytrace=False)


@pytest.fixture(params=VERSIONS, ids=[f"ctrd{v}" for v in VERSIONS])
def containerd(request: pytest.FixtureRequest, containerd_factory: ContainerdFactory) -> Containerd:
    """A running private containerd of each version, stock runc runtime, test images imported."""
    return containerd_factory(request.param)


@pytest.fixture
def s3_server(tmp_path: Path) -> Iterator[S3Server]:
    """A real S3-compatible server on 127.0.0.1 (tests/harness/s3server.py), its own port and credentials."""
    server = S3Server(tmp_path).start()
    try:
        yield server
    finally:
        server.stop()
