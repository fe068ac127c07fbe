"""CPU affinity (``dhow serve --cpu-affinity auto``): each server process's event loop on a CPU of its own, the
writer processes (payload log, tracing, audit trail) on the others.

The event loop's thread is where every request's Python runs; at load it is the bottleneck. Unpinned, the writers'
wake-ups (a frame every 10 ms, its rendering in steps) land on whichever CPU the scheduler picks, often the loop's:
the loop is preempted, migrates, and its caches go cold (measured on 2 vCPUs: the loop preempted ~4x as often with
the payload log on). Pinned, the loop keeps its CPU and the writers work beside it. The model's threads and process
instances keep every CPU the server was given (they are on the request's path: the loop waits for them), as do
the threads the loop starts for blocking work.

The plan is made once per server process (``pin_loop``) from the CPUs it may use (its cgroup's cpuset, taskset):
with N workers the N loops take the first N of them and the writers the rest, so it needs more CPUs than workers.
Children learn it from the environment (``DHOW_CPU_PLAN``) and place themselves at start (``as_helper``,
``as_any``): a child inherits the mask of the thread that started it, the loop's. So does every thread a library
starts (librdkafka's, an executor's): what starts threads of its own is built on a placed thread (``placed``), an
executor's threads place themselves (``initializer=as_any``). Linux only (``sched_setaffinity``).
Off by default: on a host shared with other work (a node without the Kubernetes static CPU manager), a pinned loop
cannot move away from a busy CPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from dhow.core.errors import InvalidInput

__all__ = ["PLAN_ENV", "as_any", "as_helper", "check", "pin_loop", "placed"]

#: the plan, as children read it: every CPU the server may use, then the writers' (``0,1,2,3|2,3``)
PLAN_ENV = "DHOW_CPU_PLAN"

T = TypeVar("T")


def check(workers: int) -> list[int]:
    """The CPUs this process may use, when there are more than ``workers`` (a loop each, and the writers'); else
    InvalidInput, saying what to do."""
    if not hasattr(os, "sched_setaffinity"):
        raise InvalidInput("--cpu-affinity auto needs Linux (sched_setaffinity); leave it off on this system")
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) <= workers:
        raise InvalidInput(
            f"--cpu-affinity auto needs more CPUs than workers (a CPU for each event loop and one for the writers): "
            f"{workers} worker(s), CPU(s) {_text(allowed)} allowed; use fewer --workers or leave it off"
        )
    return allowed


def pin_loop(workers: int, index: int) -> str:
    """Pin the calling thread (the event loop's, before it starts anything) to worker ``index``'s CPU (0-based) and
    publish the plan for children; what was done, for the log. Raises InvalidInput when it cannot be done."""
    allowed = check(workers)
    loop, helpers = allowed[index], allowed[workers:]
    os.environ[PLAN_ENV] = f"{_text(allowed)}|{_text(helpers)}"
    os.sched_setaffinity(0, {loop})
    return f"the event loop pinned to CPU {loop}; the writer processes on CPU(s) {_text(helpers)}"


def as_helper() -> None:
    """Run the calling process or thread on the writers' CPUs, when the server pinned its loop (else nothing)."""
    _place(1)


def as_any() -> None:
    """Run the calling process or thread on every CPU the server may use (a model's threads and processes, the
    loop's helper threads), when the server pinned its loop (else nothing: it has them already)."""
    _place(0)


def placed(make: Callable[[], T]) -> T:
    """``make()``, run on a thread placed on every CPU the server may use when it pinned its loop (else on the
    caller's): the threads it starts (a client library's) inherit those CPUs, not the loop's. Its exceptions
    propagate."""
    if not os.environ.get(PLAN_ENV):
        return make()
    with ThreadPoolExecutor(1, thread_name_prefix="dhow-placed", initializer=as_any) as once:
        return once.submit(make).result()


def _place(part: int) -> None:
    plan = os.environ.get(PLAN_ENV)
    if not plan or not hasattr(os, "sched_setaffinity"):
        return
    with contextlib.suppress(ValueError, IndexError, OSError):  # (a plan this process cannot apply: left as it is)
        os.sched_setaffinity(0, {int(cpu) for cpu in plan.split("|")[part].split(",")})


def _text(cpus: list[int]) -> str:
    return ",".join(map(str, cpus))
