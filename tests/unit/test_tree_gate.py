"""mount.tree_gate: shared holders run together; an exclusive one waits for them,
keeps new ones out, and never starves."""

from __future__ import annotations

import trio
import trio.testing

from mount.tree_gate import TreeGate


def test_exclusive_waits_for_shared_and_keeps_new_ones_out():
    events: list[str] = []

    async def main() -> None:
        gate = TreeGate()
        first_in = trio.Event()
        release_first = trio.Event()

        async def shared(name: str, entered: trio.Event | None = None,
                         hold: trio.Event | None = None) -> None:
            async with gate.shared():
                events.append(f"{name} in")
                if entered is not None:
                    entered.set()
                if hold is not None:
                    await hold.wait()
                events.append(f"{name} out")

        async def exclusive() -> None:
            async with gate.exclusive():
                events.append("x in")
                await trio.sleep(0)
                events.append("x out")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(shared, "a", first_in, release_first)
            await first_in.wait()
            nursery.start_soon(exclusive)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(shared, "b")  # arrives while x waits: goes after x
            await trio.testing.wait_all_tasks_blocked()
            assert events == ["a in"]
            release_first.set()
    trio.run(main)
    assert events == ["a in", "a out", "x in", "x out", "b in", "b out"]


def test_a_cancelled_exclusive_waiter_lets_shared_ones_go():
    async def main() -> list[str]:
        gate = TreeGate()
        done: list[str] = []
        inside = trio.Event()
        leave = trio.Event()

        async def holder() -> None:
            async with gate.shared():
                inside.set()
                await leave.wait()

        async def later() -> None:
            async with gate.shared():
                done.append("later")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder)
            await inside.wait()
            with trio.move_on_after(0.01) as scope:  # gives up before the holder leaves
                async with gate.exclusive():
                    done.append("exclusive")
            assert scope.cancelled_caught
            nursery.start_soon(later)
            await trio.testing.wait_all_tasks_blocked()
            assert done == ["later"]  # not stuck behind the exclusive that went away
            leave.set()
        return done
    assert trio.run(main) == ["later"]
