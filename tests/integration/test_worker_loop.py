"""The worker's batch loop on the tiny checkpoints: every request it is sent is answered exactly once."""

from __future__ import annotations

from collections import Counter

from pipelines.engine import Engine
from pipelines.messages import Failure, Progress, RenderRequest, RenderResult
from pipelines.worker import serve


def request(request_id: str, model: str = "flux.2-dev", **fields) -> RenderRequest:
    return RenderRequest(request_id, model, "a red fox", 32, 32, 2, 4.0, [1], **fields)


def answers(engine: Engine, batches: list[list[RenderRequest]], cancelled: set[str]) -> list[object]:
    sent: list[object] = []
    serve(engine, iter(batches), sent.append, cancelled)
    return [message for message in sent if not isinstance(message, Progress)]


def answered(messages: list[object]) -> Counter[str]:
    ids: Counter[str] = Counter()
    for message in messages:
        if isinstance(message, RenderResult):
            ids[message.id] += 1
        elif isinstance(message, Failure):
            ids.update(message.ids)
    return ids


def test_a_batch_cancelled_before_the_worker_took_it_is_answered_cancelled(engine: Engine) -> None:
    cancelled = {"a", "b"}
    messages = answers(engine, [[request("a"), request("b")]], cancelled)
    assert [(m.ids, m.code) for m in messages if isinstance(m, Failure)] == [(["a", "b"], "cancelled")]
    assert answered(messages) == {"a": 1, "b": 1}
    assert not cancelled  # nothing of a finished batch stays behind


def test_a_cancelled_request_leaves_its_batch_mates_running(engine: Engine) -> None:
    messages = answers(engine, [[request("gone"), request("kept")], [request("next")]], {"gone"})
    assert answered(messages) == {"gone": 1, "kept": 1, "next": 1}
    [failure] = [m for m in messages if isinstance(m, Failure)]
    assert (failure.ids, failure.code) == (["gone"], "cancelled")
    assert {m.id for m in messages if isinstance(m, RenderResult)} == {"kept", "next"}


def test_a_failing_batch_answers_each_request_once(engine: Engine) -> None:
    # FluxPipeline refuses a max_sequence_length over 512 before it encodes anything.
    bad = {"max_sequence_length": 100000}
    messages = answers(
        engine, [[request("x", "flux.1-dev", extra=bad), request("y", "flux.1-dev", extra=bad)]], set()
    )
    assert answered(messages) == {"x": 1, "y": 1}
    assert [m.code for m in messages if isinstance(m, Failure)] == ["invalid_value"]
