"""``CallRunner`` (``protocols/runner.py``) drives a request's coroutine without a Task: code the request reaches
may still time itself or group tasks, as under a Task (redis' asyncio client times every command)."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import pytest

from dhow.protocols.runner import CallRunner


def _run(coroutine_function: Any) -> Any:
    async def scenario() -> Any:
        loop = asyncio.get_running_loop()
        outcome: dict[str, Any] = {}

        async def request() -> None:
            try:
                outcome["value"] = await coroutine_function()
            except BaseException as exc:
                outcome["error"] = exc
                raise

        runner = CallRunner(loop, request(), "a test request")
        runner.start()
        await asyncio.wait_for(runner.finished(), 10)
        return outcome

    return asyncio.run(scenario())


def test_the_runner_is_the_current_task_of_each_step_and_of_no_other_code() -> None:
    async def request() -> tuple[Any, Any]:
        first = asyncio.current_task()
        await asyncio.sleep(0)
        await asyncio.sleep(0.01)
        return first, asyncio.current_task()

    first, later = _run(request)["value"]
    assert isinstance(first, CallRunner) and later is first


def test_a_timeout_that_expires_raises_timeout_error_and_one_that_does_not_stays_silent() -> None:
    async def request() -> tuple[str, str]:
        async with asyncio.timeout(5):
            await asyncio.sleep(0.01)
        try:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(5)
        except TimeoutError:
            return "in time", "timed out"
        return "in time", "not timed out"

    assert _run(request)["value"] == ("in time", "timed out")
    assert _run(lambda: asyncio.wait_for(asyncio.sleep(5), 0.01)).get("error").__class__ is TimeoutError


def test_a_task_group_runs_its_tasks_and_cancels_them_on_a_failure() -> None:
    async def request() -> list[int]:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(asyncio.sleep(0.01, result=n)) for n in range(3)]
        return [t.result() for t in tasks]

    assert _run(request)["value"] == [0, 1, 2]

    async def failing() -> None:
        async def boom() -> None:
            raise ValueError("boom")

        async with asyncio.TaskGroup() as group:
            group.create_task(asyncio.sleep(5))
            group.create_task(boom())

    error = _run(failing)["error"]
    assert isinstance(error, ExceptionGroup) and isinstance(error.exceptions[0], ValueError)


def test_a_cancelled_runner_ends_its_coroutine_with_cancelled_error() -> None:
    async def scenario() -> BaseException | None:
        loop = asyncio.get_running_loop()
        seen: list[BaseException] = []

        async def request() -> None:
            try:
                await asyncio.sleep(5)
            except BaseException as exc:
                seen.append(exc)
                raise

        runner = CallRunner(loop, request(), "a test request")
        runner.start()
        await asyncio.sleep(0.01)
        assert runner.cancel() and runner.cancelling() == 1
        await asyncio.wait_for(runner.finished(), 10)
        return seen[0] if seen else None

    assert isinstance(asyncio.run(scenario()), asyncio.CancelledError)


@pytest.mark.parametrize("steps", [1, 3])
def test_no_task_is_left_current_after_a_step(steps: int) -> None:
    async def request() -> int:
        for _ in range(steps):
            await asyncio.sleep(0)
        return steps

    async def scenario() -> Any:
        loop = asyncio.get_running_loop()
        here = asyncio.current_task()
        runner = CallRunner(loop, request(), "a test request")
        loop.call_soon(runner.start)
        await asyncio.wait_for(runner.finished(), 10)
        return here is asyncio.current_task()

    assert asyncio.run(scenario())


def test_an_awaited_future_that_fails_raises_its_own_exception_in_the_coroutine_with_its_context() -> None:
    """The runner resumes the coroutine from the future's done callback: what the future failed with is thrown
    in (the same object, as under a Task), and the coroutine's own context is still the one it runs in."""
    failure = ValueError("the awaited work failed")
    mark: contextvars.ContextVar[str] = contextvars.ContextVar("mark", default="unset")

    async def request() -> Any:
        mark.set("the request's")
        future = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(future.set_exception, failure)
        try:
            await future
        except ValueError as exc:
            return exc, mark.get()
        return None, mark.get()

    assert _run(request)["value"] == (failure, "the request's")


def test_awaiting_something_other_than_a_future_raises_runtime_error_in_the_coroutine() -> None:
    class NotAFuture:
        def __await__(self) -> Any:
            yield "not a future"

    async def request() -> None:
        await NotAFuture()

    assert isinstance(_run(request)["error"], RuntimeError)


def test_a_runner_made_to_start_soon_runs_its_coroutine_on_the_loops_next_pass_as_its_current_task() -> None:
    async def scenario() -> tuple[list[str], Any, Any]:
        loop = asyncio.get_running_loop()
        order: list[str] = []
        seen: dict[str, Any] = {}

        async def request() -> None:
            order.append("the coroutine")
            seen["task"] = asyncio.current_task()

        runner = CallRunner(loop, request(), "a test request", soon=True)
        order.append("made")
        await asyncio.wait_for(runner.finished(), 10)
        return order, seen["task"], runner

    order, task, runner = asyncio.run(scenario())
    assert order == ["made", "the coroutine"] and task is runner
