"""The stall rule on its own: any progress keeps a stream alive, silence gets it cancelled.

The real gRPC cancellation is tested end to end in test_admin.py; here a stand-in context
only records that it was cancelled, so the timing rule can be driven by a fake clock.
"""

from __future__ import annotations

from aggregator.stall_watch import StallWatch


class Context:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_slow_but_moving_upload_stays_and_a_silent_one_goes() -> None:
    clock, evicted = Clock(), []
    watch = StallWatch(10.0, lambda clinic, idle: evicted.append((clinic, idle)), clock=clock)
    moving, silent = Context(), Context()
    t_moving = watch.watch(moving, "clinic-a")  # type: ignore[arg-type]
    watch.watch(silent, "clinic-b")  # type: ignore[arg-type]
    for _ in range(5):  # 45 s in all, a chunk every 9 s from clinic-a only
        clock.now += 9.0
        watch.progress(t_moving)
        watch.evict_stalled()
    assert not moving.cancelled and silent.cancelled
    assert evicted == [("clinic-b", 18.0)]
    watch.done(t_moving)
    clock.now += 100.0
    assert watch.evict_stalled() == []  # a finished stream is never cancelled


def test_zero_turns_the_watch_off() -> None:
    clock = Clock()
    watch = StallWatch(0.0, clock=clock)
    ctx = Context()
    watch.watch(ctx, "clinic-a")  # type: ignore[arg-type]
    clock.now += 1e6
    assert watch.evict_stalled() == [] and not ctx.cancelled
