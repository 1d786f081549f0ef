"""The pass scheduler's ordering and no-starvation rules, against fake passes (no model)."""

import threading

import pytest

from serve_app.engine.scheduling import PassScheduler, RequestClass

I, B = RequestClass.INTERACTIVE, RequestClass.BATCH  # noqa: E741  (I and B read as the two classes)


class Recorder:
    """Fake passes: each appends its name when it runs; `gate` holds the lane until released."""

    def __init__(self):
        self.ran: list[str] = []
        self.gate = threading.Event()
        self.started = threading.Event()

    def blocker(self):
        self.started.set()
        self.gate.wait(10)
        return "blocker"

    def fake(self, name):
        def run():
            self.ran.append(name)
            return name

        return run


def run_queued(scheduler: PassScheduler, recorder: Recorder, queued: list[tuple[RequestClass, str]]) -> list[str]:
    """Hold the lane with one pass, queue `queued` behind it, release, return the order they ran in."""
    first = scheduler.submit(B, recorder.blocker)
    assert recorder.started.wait(10)
    futures = [scheduler.submit(request_class, recorder.fake(name)) for request_class, name in queued]
    recorder.gate.set()
    assert first.result(10) == "blocker"
    assert [f.result(10) for f in futures] == [name for _, name in queued]
    return recorder.ran


@pytest.fixture
def one_lane():
    scheduler = PassScheduler(lanes=1, batch_share=0.25)
    yield scheduler
    scheduler.close()


def test_an_interactive_pass_goes_before_queued_batch_passes(one_lane):
    order = run_queued(one_lane, Recorder(), [(B, "b1"), (B, "b2"), (I, "q1"), (B, "b3")])
    # Three batch passes were queued first; the query waited only for the pass already running.
    assert order[0] == "q1"
    assert order[1:] == ["b1", "b2", "b3"]  # first come, first served within a class


def test_batch_keeps_its_share_while_both_classes_wait(one_lane):
    queued = [(B, f"b{i}") for i in range(4)] + [(I, f"q{i}") for i in range(16)]
    order = run_queued(one_lane, Recorder(), queued)
    # share 0.25: every fourth pass started while both wait is a batch pass.
    assert order[:8] == ["q0", "q1", "q2", "b0", "q3", "q4", "q5", "b1"]
    assert order.index("b3") < order.index("q12")  # batch finished while queries still waited


@pytest.mark.parametrize("share", [0.1, 0.5])
def test_the_share_holds_over_a_long_contest(share):
    scheduler = PassScheduler(lanes=1, batch_share=share)
    try:
        queued = [(B, f"b{i}") for i in range(100)] + [(I, f"q{i}") for i in range(100)]
        order = run_queued(scheduler, Recorder(), queued)
    finally:
        scheduler.close()
    first_hundred = order[:100]
    assert sum(name.startswith("b") for name in first_hundred) == int(share * 100)


def test_on_several_lanes_every_pass_runs_once_and_answers_its_own_future():
    scheduler = PassScheduler(lanes=3, batch_share=0.25)
    ran, lock = [], threading.Lock()

    def note(k):
        with lock:
            ran.append(k)
        return k

    futures = [scheduler.submit(I, lambda k=k: note(k)) for k in range(50)]
    assert [f.result(10) for f in futures] == list(range(50))
    scheduler.close()
    assert sorted(ran) == list(range(50))


def test_a_failing_pass_fails_only_its_own_future(one_lane):
    def boom():
        raise RuntimeError("out of memory")

    bad = one_lane.submit(I, boom)
    good = one_lane.submit(I, lambda: 7)
    with pytest.raises(RuntimeError, match="out of memory"):
        bad.result(10)
    assert good.result(10) == 7


def test_close_finishes_what_is_queued_then_refuses_more():
    scheduler = PassScheduler(lanes=1, batch_share=0.25)
    futures = [scheduler.submit(B, lambda k=k: k) for k in range(5)]
    scheduler.close()
    assert [f.result(0) for f in futures] == list(range(5))
    with pytest.raises(RuntimeError):
        scheduler.submit(I, lambda: 0)


def test_the_share_must_be_a_fraction():
    for share in (0, 1, 1.5):
        with pytest.raises(ValueError):
            PassScheduler(lanes=1, batch_share=share)
