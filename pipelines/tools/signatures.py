"""`python -m pipelines.tools.signatures`: writes pipelines/contract/signatures.json, the passthrough
arguments of the served pipeline classes, from the installed diffusers (a test fails when the two differ)."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterable
from pathlib import Path

from pipelines.contract.arguments import SET_BY_FLUXD, SIGNATURES, served_pipeline_classes


def passthrough_signatures(pipeline_classes: Iterable[str]) -> dict[str, dict[str, str]]:
    """Per diffusers pipeline class: the call arguments a client may pass through, with their annotation as
    text. Imports diffusers (and torch)."""
    import diffusers

    signatures: dict[str, dict[str, str]] = {}
    for class_name in sorted(set(pipeline_classes)):
        params = inspect.signature(getattr(diffusers, class_name).__call__).parameters
        signatures[class_name] = {
            name: str(param.annotation) for name, param in params.items() if name not in SET_BY_FLUXD
        }
    return signatures


def write_signatures(path: Path = SIGNATURES) -> None:
    path.write_text(json.dumps(passthrough_signatures(served_pipeline_classes()), indent=2) + "\n")


if __name__ == "__main__":
    write_signatures()
