"""Shared fixtures: the tiny random-weight checkpoints, written once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# One thread per process: the suite runs on pytest-xdist workers, each driving a server or an engine at once,
# and two OpenMP threads per process on a 2-core machine make every process wait on the other's cores (the
# same tests took a third more CPU with two). Set before anything imports torch; servers inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The longest modules start first, longest first: with pytest-xdist's --dist loadgroup (README's test command)
# a module runs whole on one worker, and a long one started last would finish alone while the others idle.
FIRST = (
    "tests/ray/",
    "tests/e2e/test_serving.py",
    "tests/e2e/test_job_faults.py",
    "tests/e2e/test_store.py",
    "tests/e2e/test_job_requests.py",
    "tests/e2e/test_async_jobs.py",
    "tests/integration/test_synthetic.py",
    "tests/e2e/test_cli_demo.py",
    "tests/integration/test_run_modes.py",
)


# Servers that several modules share (tests/e2e/conftest.py): the modules using one run on one xdist worker,
# which starts it once. A server start costs about ten CPU-seconds, nearly all of it the worker importing
# torch and diffusers.
SHARED_SERVERS = ("keyed_server", "strict_server")


# tryfirst: pytest-xdist reads the xdist_group marks in a hook of its own, which must see these.
@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return next((i for i, prefix in enumerate(FIRST) if path.startswith(prefix)), len(FIRST))

    items.sort(key=rank)  # stable: the order within each module is kept
    # Under --dist loadgroup an item without a group would be sent to any worker: each module is a group of
    # its own (as under --dist loadfile), unless its tests use a shared server, whose group it joins.
    shared: dict[str, str] = {}
    for item in items:
        server = next((name for name in SHARED_SERVERS if name in getattr(item, "fixturenames", ())), None)
        if server is not None:
            shared.setdefault(item.nodeid.split("::")[0], server)
    for item in items:
        module = item.nodeid.split("::")[0]
        item.add_marker(pytest.mark.xdist_group(shared.get(module, module)))


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoints, written once per run: pytest-xdist's workers share one copy (the first to get
    the lock writes it), which no test changes."""
    from filelock import FileLock

    from pipelines.tools.tiny import write_tiny

    base = tmp_path_factory.getbasetemp()
    # Under xdist each worker's folder sits in the run's own; without it, the run's folder is the base.
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "tiny-weights"
    written = Path(f"{root}.written")  # beside the folder: servers read every entry in it
    with FileLock(f"{root}.lock"):
        if not written.exists():
            write_tiny(root)
            written.touch()
    return root


def link_tiny_checkpoints(tiny_weights: Path, root: Path, but: str) -> Path:
    """`root` with a link to each of the tiny checkpoints' folders except `but`, which the caller fills."""
    for folder in tiny_weights.iterdir():
        if folder.name != but:
            (root / folder.name).symlink_to(folder)
    return root
