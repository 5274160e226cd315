"""Shared fixtures: the tiny random-weight checkpoints, written once per test session."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

# One thread per process: the suite runs on pytest-xdist workers, each driving a server or an engine at once,
# and two OpenMP threads per process on a 2-core machine make every process wait on the other's cores (the
# same tests took a third more CPU with two). Set before anything imports torch; servers inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The longest modules start first, longest first: with pytest-xdist's --dist loadfile (README's test command)
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


# Servers that several modules share (tests/e2e/conftest.py), by group; each group's modules run on one xdist
# worker, which starts its servers once. A server start costs about ten CPU-seconds, nearly all of it the
# worker importing torch and diffusers.
GROUP_OF_SERVER = {"server": "demo", "strict_server": "demo", "keyed_server": "keyed"}
MODULES_OF_GROUP = {
    "demo": (
        "tests/browser/test_playground.py",
        "tests/e2e/test_acceleration.py",
        "tests/e2e/test_clients.py",
        "tests/e2e/test_default_model.py",
        "tests/e2e/test_errors.py",
        "tests/e2e/test_hardening.py",
        "tests/e2e/test_images_api.py",
        "tests/e2e/test_masks.py",
        "tests/e2e/test_safety.py",
        "tests/e2e/test_serving.py",
        "tests/e2e/test_streaming.py",
    ),
    "keyed": ("tests/e2e/test_auth.py", "tests/e2e/test_readme_snippets.py"),
}
GROUP_OF = {module: group for group, modules in MODULES_OF_GROUP.items() for module in modules}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return next((i for i, prefix in enumerate(FIRST) if path.startswith(prefix)), len(FIRST))

    items.sort(key=rank)  # stable: the order within each module is kept
    for item in items:
        module = item.nodeid.split("::")[0]
        for server in GROUP_OF_SERVER.keys() & set(getattr(item, "fixturenames", ())):
            if GROUP_OF.get(module) != GROUP_OF_SERVER[server]:
                raise pytest.UsageError(f"{module} uses {server}: add it to MODULES_OF_GROUP here")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """--dist loadfile, with the modules that share a server taken as one file. (--dist loadgroup groups by
    marks, but under pytest 9.2 pytest-xdist 3.8 can no longer tag the node ids it groups by, and it silently
    spreads every test: pytest-dev/pytest-xdist#1386.)"""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class ByServer(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = super()._split_scope(nodeid)
            return GROUP_OF.get(module, module)

    return ByServer(config, log)


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
