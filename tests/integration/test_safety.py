"""The safety checker on the tiny mirrors, as Engine.render runs it after decode: a flagged image is black
and says has_nsfw_concepts true, an unflagged one is untouched, a request that does not ask is not checked,
and a worker without the classifier says so per image instead of pretending."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest

from pipelines.contract.messages import RenderRequest, RenderResult
from pipelines.contract.specs import SPECS
from pipelines.engine.engine import Engine
from pipelines.engine.safety import NOT_CHECKED, SafetyChecker
from pipelines.tools.tiny_extras import write_safety_checker


@pytest.fixture(scope="module")
def rendered(tiny_weights: Path) -> tuple[list[RenderRequest], list[RenderResult]]:
    batch = [
        RenderRequest(f"r{i}", "flux.1-dev", "a fox", 64, 48, 2, 3.5, [i, i + 10], safety_check=check)
        for i, check in enumerate((True, False))
    ]
    # Rendered unchecked (the engine checks those that ask, after decode), for each test to check its way.
    unchecked = [dataclasses.replace(request, safety_check=False) for request in batch]
    return batch, Engine(SPECS, tiny_weights).render(unchecked)


def checked(
    rendered: tuple[list[RenderRequest], list[RenderResult]], checker: SafetyChecker
) -> list[RenderResult]:
    batch, results = rendered
    results = copy.deepcopy(results)
    checker.apply(batch, results)
    return results


def test_flagged_images_are_black_and_say_so(rendered, tmp_path: Path) -> None:
    asked, not_asked = checked(rendered, SafetyChecker(write_safety_checker(tmp_path / "s", verdict="nsfw")))
    assert [image.nsfw for image in asked.images] == [True, True]
    assert all(image.data == bytes(len(image.data)) for image in asked.images)
    assert "safety" in asked.timings_ms
    original = rendered[1][1]
    assert [image.nsfw for image in not_asked.images] == [None, None]  # it did not ask: left as rendered
    assert [i.data for i in not_asked.images] == [i.data for i in original.images]


def test_unflagged_images_are_untouched(rendered, tmp_path: Path) -> None:
    asked, _ = checked(rendered, SafetyChecker(write_safety_checker(tmp_path / "s", verdict="normal")))
    assert [image.nsfw for image in asked.images] == [False, False]
    assert [i.data for i in asked.images] == [i.data for i in rendered[1][0].images]


def test_a_flag_follows_the_threshold(rendered, tmp_path: Path) -> None:
    folder = write_safety_checker(tmp_path / "s", verdict="normal")  # nsfw probability ~0.0003
    asked, _ = checked(rendered, SafetyChecker(folder, threshold=0.0))
    assert [image.nsfw for image in asked.images] == [True, True]


def test_without_a_classifier_each_image_says_it_was_not_checked(rendered, tmp_path: Path) -> None:
    asked, not_asked = checked(rendered, SafetyChecker(tmp_path / "absent"))
    assert [(image.nsfw, image.safety_note) for image in asked.images] == [(None, NOT_CHECKED)] * 2
    assert [i.data for i in asked.images] == [i.data for i in rendered[1][0].images]
    assert [image.safety_note for image in not_asked.images] == [None, None]
