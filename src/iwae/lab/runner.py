"""Tasks and runners: how a sweep hands its work out and learns how it ended.

- :class:`Task`: one :func:`iwae.lab.run.run_group` (one run, or one stack of runs), picklable for a worker
  process or a cluster job;
- :func:`run_task`: what the worker or the job calls; it never raises;
- :class:`TaskEnd`: how a task ended, as its runner saw it;
- a runner (:data:`Runner`) takes a phase's tasks and runs them. :class:`LocalRunner` (the default) runs each task
  in a fresh process (forked from a ``forkserver`` that has imported torch, else ``spawn``), ``workers`` at a time
  with ``cores // workers`` threads each; its processes end with the sweep however it ends
  (:mod:`iwae.lab.lifeline`). :class:`iwae.lab.cluster.SubmititRunner` submits each phase as one Slurm job array.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing import connection, get_all_start_methods, get_context
from typing import Any

from iwae import locks
from iwae.lab import lifeline
from iwae.lab.run import run_group

# The forkserver imports these before it forks any worker; iwae.lab.lifeline first (it ties the server to the sweep).
PRELOAD = [
    "iwae.lab.lifeline",
    "torch",
    "torch._dynamo",
    "matplotlib.pyplot",
    "iwae.train",
    "iwae.evaluate",
    "iwae.sampling",
]


@dataclass(frozen=True)
class Task:
    """One unit of a sweep's work, picklable for a worker process or a cluster job.

    The specs of one :func:`~iwae.lab.run.run_group` and how to run them. ``attempt`` marks the result files this
    task writes, so that the sweep never takes an older attempt's file for this one's.
    """

    specs: tuple[dict[str, Any], ...]
    out_dir: str
    attempt: str
    device: str = "auto"
    data_dir: str | None = None
    env: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskEnd:
    """How a task ended, as its runner saw it.

    Both fields None: it ran (each run's outcome is in its result file). ``busy``: another process holds one of its
    runs (nothing was touched). ``error``: it ended without writing its results (a crash, a killed process, a failed
    or cancelled cluster job).
    """

    busy: str | None = None
    error: str | None = None


def run_task(task: Task, threads: int | None = None) -> TaskEnd:
    """What a worker process or a cluster job calls: :func:`~iwae.lab.run.run_group` on the task. Never raises."""
    try:
        run_group(list(task.specs), task.out_dir, device=task.device, data_dir=task.data_dir, threads=threads,
                  env=task.env or None, attempt=task.attempt)  # fmt: skip
    except locks.LockBusy as busy:
        return TaskEnd(busy=str(busy))
    except Exception as error:
        return TaskEnd(error=f"{type(error).__name__}: {error}")
    return TaskEnd()


# A runner takes a phase's tasks and runs them, calling started(task) as each is handed on and done(task, end) as
# each ends (in the calling thread, which is the sweep's and the database's one writer).
Runner = Callable[[list[Task], Callable[[Task], None], Callable[[Task, TaskEnd], None]], None]


def available_cores() -> int:
    """The cores this process may run on (its affinity on Linux, else the CPU count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _context():
    """Fresh processes for the runs: forked from a server that has imported torch (and nothing has run
    torch's thread pools in it), which saves each run the imports; plain ``spawn`` where that is missing."""
    if "forkserver" not in get_all_start_methods():
        return get_context("spawn")
    context = get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _work(task: Task, writer: Any, sweep_pid: int, threads: int) -> None:
    """A worker process: tied to the sweep (it ends with it), it runs the task and sends back how it ended."""
    lifeline.watch(sweep_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: the sweep ends its workers
    writer.send(run_task(task, threads))
    writer.close()


class LocalRunner:
    """Runs each task in a fresh process on this machine, ``workers`` at a time.

    Each process has ``cores // workers`` threads, comes from :func:`_context` and ends with the sweep, however it
    ends (:mod:`iwae.lab.lifeline`); if the sweep stops on an exception (Ctrl-C included) it kills them first.
    """

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"--workers must be >= 1, got {workers}")
        self.workers = workers
        self.threads = max(1, available_cores() // workers)

    def __call__(
        self, tasks: list[Task], started: Callable[[Task], None], done: Callable[[Task, TaskEnd], None]
    ) -> None:
        context, queue = _context(), list(tasks)
        live: dict[int, tuple[Any, Any, Task]] = {}  # sentinel -> (process, pipe's reading end, task)
        # Inherited by the forkserver when it starts (each worker also sets torch's threads); the pid ties it to us.
        saved = {key: os.environ.get(key) for key in ("OMP_NUM_THREADS", lifeline.SWEEP_PID_ENV)}
        os.environ.update({"OMP_NUM_THREADS": str(self.threads), lifeline.SWEEP_PID_ENV: str(os.getpid())})
        try:
            while queue or live:
                while queue and len(live) < self.workers:
                    task = queue.pop(0)
                    reader, writer = context.Pipe(duplex=False)
                    process = context.Process(target=_work, args=(task, writer, os.getpid(), self.threads),
                                              name=f"iwae-sweep-{task.specs[0]['name']}")  # fmt: skip
                    started(task)
                    process.start()
                    writer.close()
                    live[process.sentinel] = (process, reader, task)
                for sentinel in connection.wait(list(live)):
                    process, reader, task = live.pop(sentinel)
                    process.join()
                    try:
                        end = reader.recv()
                    except EOFError:
                        end = TaskEnd(error=f"the worker process ended with exit code {process.exitcode}")
                    reader.close()
                    done(task, end)
        finally:
            for process, reader, _ in live.values():
                process.kill()
                process.join()
                reader.close()
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
