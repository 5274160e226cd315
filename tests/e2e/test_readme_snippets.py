"""README's "Calling it" blocks, run as they stand (only address and key swapped) on a keyed demo server."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.e2e.conftest import README_KEY, Server

ROOT = Path(__file__).resolve().parents[2]
NODE_MODULES = Path(__file__).resolve().parent / "node" / "node_modules"
README_URL = "http://localhost:8000"
KEY = README_KEY


@dataclass(frozen=True)
class Snippet:
    fence: str  # the code block's info string in README.md
    filename: str
    command: list[str]
    files: dict[str, tuple[int, int]]  # image files it writes -> the size the README's parameters ask for
    urls: tuple[tuple[int, int], ...]  # sizes of the image URLs it prints, in order
    inputs: tuple[str, ...] = ()  # pictures of the user's own that it reads


SNIPPETS = [
    # "16:9" at resolution 0.5K; the edit's explicit 512x512.
    Snippet(
        "python",
        "calling.py",
        [sys.executable, "calling.py"],
        {"lighthouse.png": (688, 384)},
        ((512, 512),),
        ("cat.png", "sofa.png"),
    ),
    Snippet("js", "fox.mjs", ["node", "fox.mjs"], {}, ((256, 256),)),  # no size: the demo's default
    # 3:2 at 0.5K, then an edit that keeps it (match_input). pipefail: a failing curl or jq fails the block.
    Snippet(
        "bash",
        "calling.sh",
        ["bash", "-euo", "pipefail", "calling.sh"],
        {"fox.png": (624, 416), "fox-night.png": (624, 416)},
        (),
    ),
]


def calling_it_blocks() -> dict[str, str]:
    """The fenced code blocks of README's "## Calling it" section, by info string."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Calling it\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```(\w+)\n(.*?)^```$", section, flags=re.MULTILINE | re.DOTALL)
    fences = [fence for fence, _ in blocks]
    assert sorted(fences) == sorted(s.fence for s in SNIPPETS), f"README's Calling it blocks: {fences}"
    return dict(blocks)


def missing_tools(snippet: Snippet) -> str | None:
    """Why this machine cannot run the snippet, or None."""
    needs = {"js": ["node"], "bash": ["curl", "jq", "base64"]}.get(snippet.fence, [])
    absent = [tool for tool in needs if shutil.which(tool) is None]
    if absent:
        return f"{', '.join(absent)} not installed"
    if snippet.fence == "js" and not (NODE_MODULES / "openai").is_dir():
        return "the openai npm package is missing: npm ci --prefix tests/e2e/node (.ci/run does)"
    return None


def runnable(snippet: Snippet) -> pytest.ParameterSet:
    # Decided at collection, so a machine without node or jq does not start a server for nothing.
    reason = missing_tools(snippet)
    why = f"README {snippet.fence} snippet not run: {reason}"
    return pytest.param(snippet, id=snippet.fence, marks=pytest.mark.skipif(reason is not None, reason=why))


def fetch_image(url: str) -> Image.Image:
    # /v1/files sits behind the key like every /v1 path: the URL alone does not fetch the image.
    response = httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert response.status_code == 200, f"{url}: {response.status_code} {response.text}"
    return Image.open(io.BytesIO(response.content))


@pytest.fixture()
def keyed(keyed_server: Server) -> Server:
    """The shared keyed server (tests/e2e/conftest.py), which takes KEY among its keys."""
    return keyed_server


@pytest.mark.timeout(600)
@pytest.mark.parametrize("snippet", [runnable(snippet) for snippet in SNIPPETS])
def test_readme_snippet_runs_and_makes_images(keyed: Server, snippet: Snippet, tmp_path: Path) -> None:
    code = calling_it_blocks()[snippet.fence]
    code = re.sub(r"\bKEY\b", KEY, code.replace(README_URL, keyed.url))
    (tmp_path / snippet.filename).write_text(code)
    for index, name in enumerate(snippet.inputs):
        Image.new("RGB", (256 + 64 * index, 256), (40 * index, 120, 200)).save(tmp_path / name)
    if snippet.fence == "js":
        # ESM resolves `import "openai"` from the script's folder upwards, never from NODE_PATH.
        (tmp_path / "node_modules").symlink_to(NODE_MODULES, target_is_directory=True)

    done = subprocess.run(
        snippet.command, cwd=tmp_path, capture_output=True, text=True, timeout=540, check=False
    )
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"

    made = {name: Image.open(tmp_path / name).size for name in snippet.files}
    assert made == snippet.files
    urls = re.findall(rf"{re.escape(keyed.url)}/v1/files/images/\S+", done.stdout)
    assert [fetch_image(url).size for url in urls] == list(snippet.urls), done.stdout
