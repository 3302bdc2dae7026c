"""The test-only sync points of engine/sync_points.py: holding a thread, ordering
two threads, callbacks, and that leaving the ``with`` block lets everyone go."""

from __future__ import annotations

import threading

import pytest

from engine import sync_points
from engine.sync_points import SyncPoints, sync_point


def run(fn) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def test_unarmed_points_cost_one_empty_dict_lookup():
    assert sync_points._armed == {}
    sync_point("anything", object())  # returns at once
    with SyncPoints() as sp:
        sp.watch("a")
        assert set(sync_points._armed) == {"a"}
    assert sync_points._armed == {}


def test_pause_holds_a_thread_until_released():
    log: list[str] = []
    with SyncPoints(timeout=10) as sp:
        sp.pause("p", when=lambda d: d == "mine")
        other = run(lambda: (sync_point("p", "other"), log.append("other")))
        other.join(10)
        assert log == ["other"]  # ``when`` did not match: not held
        t = run(lambda: (sync_point("p", "mine"), log.append("mine")))
        assert sp.wait_paused("p") == "mine"
        assert log == ["other"]
        sp.release("p")
        t.join(10)
        assert log == ["other", "mine"] and sp.passed("p") == 2
        assert not sp.timed_out


def test_order_makes_one_thread_wait_for_another():
    log: list[str] = []
    with SyncPoints(timeout=10) as sp:
        sp.order("first", "second")
        sp.pause("first")
        late = run(lambda: (sync_point("second"), log.append("second")))
        early = run(lambda: (sync_point("first"), log.append("first")))
        sp.wait_paused("first")
        assert log == []  # "second" waits for "first", which is held
        sp.release("first")
        early.join(10)
        late.join(10)
        assert log[0] == "first" and sorted(log) == ["first", "second"]
        assert not sp.timed_out


def test_callback_runs_on_the_thread_reaching_the_point():
    seen: list[tuple[str, object]] = []
    with SyncPoints() as sp:
        sp.callback("c", lambda d: seen.append((threading.current_thread().name, d)))
        t = threading.Thread(target=sync_point, args=("c", 7), name="worker")
        t.start()
        t.join(10)
    assert seen == [("worker", 7)]


def test_leaving_the_block_releases_held_threads_and_disarms():
    done = threading.Event()
    sp = SyncPoints(timeout=30)
    with sp:
        sp.pause("p")
        t = run(lambda: (sync_point("p"), done.set()))
        sp.wait_paused("p")
    assert done.wait(10)
    t.join(10)
    assert sync_points._armed == {}


def test_misuse_is_reported():
    with SyncPoints(timeout=0.2) as sp:
        with pytest.raises(RuntimeError, match="not armed"):
            sp.wait_passed("never-armed")
        sp.watch("w")
        with pytest.raises(TimeoutError):
            sp.wait_passed("w")
        with pytest.raises(TimeoutError):
            sp.wait_paused("w")
        with pytest.raises(RuntimeError, match="another test"), SyncPoints() as other:
            other.watch("w")
