"""Sweeps on a cluster through submitit: each phase of a grid becomes one Slurm job array.

``iwae sweep GRID --out DIR --executor slurm`` runs :func:`iwae.lab.sweep.run_sweep` with a
:class:`SubmititRunner`. Each of a phase's tasks (one run, or one stack of runs) becomes one task of a job array
(submitit's ``map_array``), with the partition, time limit, GPUs per task and array parallelism of
:class:`ClusterOptions`. On a node, a task runs :func:`iwae.lab.runner.run_task`: it takes the run's lock, trains
and evaluates, and writes each run's row to ``runs/NAME/result.json``; it never opens the SQLite file.

Before the sweep writes anything, the runner asks Slurm whether it would take these jobs (:func:`check_slurm`:
``scontrol ping``, ``sbatch --test-only`` with the sweep's options, the partition's time limit from ``sinfo``);
if not, one line (a ``ValueError``) says why, and nothing is written.

The submitting sweep waits for the array, indexes the result files into ``DIR/results.sqlite`` (the database's
one writer) and goes on to the next phase, which may start from this one's runs (``init_from``). It watches the
result files that submitit's tasks write and, now and then, the queue (``squeue``, not ``sacct``, which fails on
clusters without an accounting database): a task that has left the queue without a result (cancelled, failed,
timed out, its node lost) and still has none :attr:`ClusterOptions.lost_after_s` seconds later has its runs
recorded ``failed``, and the next sweep runs them again. If the sweep stops (Ctrl-C, an error) it cancels its
jobs; if it is killed outright they run on, and ``iwae results DIR --rescan`` indexes what they wrote. Submitit's
own files (the pickled tasks, each job's stdout and stderr) go to ``DIR/submitit/``.

``DIR`` must be on a file system that the nodes share with the submitting machine, and the nodes must run the
same installation of this package. ``engine = "local"`` or ``"debug"`` runs the same tasks on this machine,
through submitit's local (a process per task) and debug (in this process) executors: the tests do.

submitit is an optional dependency (``pip install 'iwae[cluster]'``), imported when a runner is made.
"""

from __future__ import annotations

import contextlib
import io
import math
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from iwae.lab.runner import Task, TaskEnd, run_task

SUBMITIT_SUBDIR = "submitit"
ENGINES = ("slurm", "local", "debug")
JOB_NAME = "iwae-sweep"
SLURM_TOOLS = ("srun", "sbatch", "squeue", "scontrol", "sinfo")  # what the runner calls, submitit included
# Slurm's states of a job that has ended (squeue --states=all lists such jobs for MinJobAge; a requeued one is back).
ENDED_STATES = frozenset(
    {"BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
     "REVOKED", "TIMEOUT"}
)  # fmt: skip
RESULT_POLL_S = 1.0  # between two looks at the tasks' result files (submitit's own pace)
QUEUE_POLL_S = (2.0, 30.0)  # between two looks at the queue: the first, doubled after each, up to the second
COMMAND_TIMEOUT_S = 60  # a Slurm command that has not answered by then has failed


@dataclass(frozen=True)
class ClusterOptions:
    """How the tasks are submitted and watched.

    Fields: Slurm's ``partition`` (None: the cluster's default), each task's ``time_limit_min`` in minutes,
    ``gpus_per_task``, ``array_parallelism`` (how many tasks of an array run at once), submitit's ``engine``
    (one of :data:`ENGINES`) and ``lost_after_s``: how long a Slurm task that has left the queue may take to
    show its result (on a shared file system, later than Slurm says it ended) before its runs are recorded
    failed.
    """

    partition: str | None = None
    time_limit_min: int = 24 * 60
    gpus_per_task: int = 0
    array_parallelism: int = 64
    engine: str = "slurm"
    lost_after_s: float = 20.0

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        for name, low in (("time_limit_min", 1), ("gpus_per_task", 0), ("array_parallelism", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")
        seconds = self.lost_after_s
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds < math.inf:
            raise ValueError(f"lost_after_s must be a number of seconds > 0, got {seconds!r}")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


# -- asking Slurm before anything is written ------------------------------------------------------------------------
def job_flags(options: ClusterOptions) -> list[str]:
    """The sbatch options of the sweep's jobs that Slurm may refuse, as submitit writes them into its script."""
    flags = [f"--job-name={JOB_NAME}", f"--time={options.time_limit_min}", f"--gpus-per-node={options.gpus_per_task}"]
    return flags + ([f"--partition={options.partition}"] if options.partition is not None else [])


def _slurm(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a Slurm command, its output captured; one that does not answer in time is a one-line ValueError."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise ValueError(
            f"--executor slurm: '{' '.join(argv[:2])}' did not answer in {COMMAND_TIMEOUT_S} s; is Slurm's "
            "controller up ('scontrol ping')?"
        ) from None


def _gist(completed: subprocess.CompletedProcess[str]) -> str:
    """The line of a failed Slurm command that says why: its fatal error, else its first error, else its first."""
    lines = [line.strip() for line in f"{completed.stderr}\n{completed.stdout}".splitlines()]
    lines = [line for line in lines if line.strip("* ")]  # not scontrol's banners of stars
    fatal = [line for line in lines if "fatal" in line.lower()]
    errors = [line for line in lines if re.search(r"error|fail|invalid|unable|denied|down", line, re.IGNORECASE)]
    return (fatal or errors or lines or [f"exit code {completed.returncode}"])[0]


def minutes(text: str) -> int | None:
    """A time limit as sinfo writes it (``days-hours:minutes:seconds``, ``hours:minutes:seconds`` or
    ``minutes:seconds``) in whole minutes, rounded up; None for ``infinite`` or another form."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){1,2})", text.strip())
    if match is None:
        return None
    parts = [int(part) for part in match.group(2).split(":")]
    if match.group(1) is not None and len(parts) != 3:
        return None
    hours, mins, secs = [0] * (3 - len(parts)) + parts
    return (int(match.group(1) or 0) * 24 + hours) * 60 + mins + (secs > 0)


def partition_time_limit(partition: str | None) -> tuple[str, int] | None:
    """The name and time limit in minutes (``sinfo``) of ``partition``, or of the default partition if None;
    None where sinfo names no such partition or it has no limit."""
    completed = _slurm(["sinfo", "--noheader", "--format=%P|%l"])
    if completed.returncode != 0:
        return None
    for line in completed.stdout.splitlines():
        name, _, limit = line.strip().partition("|")
        default = name.endswith("*")
        if (partition is None and default) or name.rstrip("*") == partition:
            found = minutes(limit)
            return None if found is None else (name.rstrip("*"), found)
    return None


def check_slurm(options: ClusterOptions) -> None:
    """Whether this machine's Slurm would take the sweep's jobs as ``options`` describe them.

    Checks the commands are on the ``PATH``, the controller answers (``scontrol ping``), ``sbatch --test-only``
    accepts the jobs' options (partition, GPUs, time limit: nothing is submitted) and the time limit is within
    the partition's (a job above it would wait in the queue forever). Writes nothing.

    Raises:
        ValueError: one line, saying what to do, where any of these fails.
    """
    for tool in SLURM_TOOLS:
        if shutil.which(tool) is None:
            raise ValueError(f"--executor slurm: no Slurm here (no {tool} on the PATH); run the sweep on a login node")
    ping = _slurm(["scontrol", "ping"])
    if ping.returncode != 0:
        raise ValueError(
            f"--executor slurm: Slurm's controller does not answer ({_gist(ping)}); run the sweep where "
            "'scontrol ping' says UP"
        )
    test = _slurm(["sbatch", "--test-only", *job_flags(options), "--wrap=true"])
    if test.returncode != 0:
        raise ValueError(
            f"--executor slurm: Slurm would refuse the sweep's jobs ({_gist(test)}); check --partition, "
            "--gpus-per-task and --time-limit against 'sinfo'"
        )
    limit = partition_time_limit(options.partition)
    if limit is not None and options.time_limit_min > limit[1]:
        name, most = limit
        raise ValueError(
            f"--executor slurm: --time-limit {options.time_limit_min} is above partition {name}'s limit of "
            f"{most} minutes, so its jobs would never start; give --time-limit {most} or less"
        )


# -- watching the queue -----------------------------------------------------------------------------------------
def queue_states(job_ids: Iterable[str]) -> dict[str, str] | None:
    """Slurm's state of each task of the jobs ``job_ids`` that the queue still lists (``squeue``), by task id
    (``12_3``; ``12`` for a job that is no array). A job the controller has forgotten is not listed; None if
    squeue did not answer."""
    argv = ["squeue", "--noheader", "--array", "--states=all", "--format=%i|%T", f"--jobs={','.join(job_ids)}"]
    try:
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if completed.returncode != 0:  # every job forgotten (past MinJobAge), or no answer from the controller
        return {} if "invalid job id" in completed.stderr.lower() else None
    states = {}
    for line in completed.stdout.splitlines():
        task_id, _, state = line.strip().partition("|")
        if state:
            states[task_id] = state
    return states


def _end_of(job: Any) -> TaskEnd:
    """How a task whose job has ended (or that runs in this process: the debug engine) ended."""
    try:
        return job.result()
    except Exception as error:  # the job failed, timed out or was cancelled: no result from it
        return TaskEnd(error=f"cluster job {job.job_id}: {_first_line(error)}")


def _lost(job: Any, state: str | None) -> TaskEnd:
    """How a task ended that left the queue (last seen in ``state``; None: no longer listed) without a result."""
    how = state or "no longer in the queue"
    log = Path(job.paths.stderr)
    where = f"; its log: {log}" if log.is_file() else ""
    return TaskEnd(error=f"cluster job {job.job_id} ended without a result ({how}){where}")


class SubmititRunner:
    """A runner for :func:`~iwae.lab.sweep.run_sweep`: a phase's tasks as one job array, waited for.

    Made before the sweep starts, it checks at once that submitit is installed and, for Slurm, that Slurm would
    take the jobs (:func:`check_slurm`); if not, a one-line ``ValueError``, nothing written. Its files go to
    ``DIR/submitit/`` of the sweep's folder.
    """

    def __init__(self, options: ClusterOptions | None = None) -> None:
        self.options = options or ClusterOptions()
        try:
            import submitit  # noqa: F401  deferred on purpose: an optional dependency, needed only here
        except ImportError:
            raise ValueError("--executor slurm needs submitit: pip install 'iwae[cluster]'") from None
        if self.options.engine == "slurm":
            check_slurm(self.options)

    def executor(self, folder: Path):
        """A submitit executor set up from the options, keeping its files in ``folder`` (created)."""
        import submitit  # deferred on purpose, as above

        executor = submitit.AutoExecutor(folder=folder, cluster=self.options.engine)
        executor.update_parameters(
            name=JOB_NAME,
            timeout_min=self.options.time_limit_min,
            gpus_per_node=self.options.gpus_per_task,
            slurm_partition=self.options.partition,  # None: left out; slurm_* is ignored by the other engines
            slurm_array_parallelism=self.options.array_parallelism,
        )
        return executor

    def __call__(
        self, tasks: list[Task], started: Callable[[Task], None], done: Callable[[Task, TaskEnd], None]
    ) -> None:
        if not tasks:
            return
        executor = self.executor(Path(tasks[0].out_dir) / SUBMITIT_SUBDIR)
        said = io.StringIO()  # what sbatch says when it refuses (submitit prints it): into the one line
        try:
            with contextlib.redirect_stderr(said):
                jobs = executor.map_array(run_task, tasks)
        except Exception as error:  # sbatch refused the array (the cluster changed since check_slurm asked)
            lines = [line.strip() for line in said.getvalue().splitlines() if line.strip()]
            said_why = lines[0] if lines else _first_line(error)
            raise ValueError(f"submitting the sweep's tasks failed: {said_why}") from None
        sys.stderr.write(said.getvalue())  # submitted: whatever submitit warned about, as it would have
        waiting = list(zip(tasks, jobs, strict=True))
        try:
            for task in tasks:
                started(task)
            if self.options.engine == "slurm":
                self._watch(waiting, done)
            while waiting:  # the local and debug engines: their jobs say themselves how they ended
                task, job = waiting[0]
                end = _end_of(job)
                waiting.pop(0)
                done(task, end)
        except BaseException:  # the sweep stops (Ctrl-C, an error): so do its jobs
            for _, job in waiting:
                job.cancel(check=False)
            raise

    def _watch(self, waiting: list[tuple[Task, Any]], done: Callable[[Task, TaskEnd], None]) -> None:
        """Hand each task of ``waiting`` to ``done`` (and take it off the list) as its Slurm task ends: when its
        result file appears, or once it has left the queue (:func:`queue_states`) and still has no result
        ``lost_after_s`` later."""
        grace = self.options.lost_after_s
        gap, most = QUEUE_POLL_S
        look = time.monotonic() + gap  # the next look at the queue
        out_since: dict[str, float] = {}  # task id -> when the queue was first seen without it
        while waiting:
            with contextlib.suppress(OSError):  # refreshes a network file system's view of the folder (as submitit)
                folder = waiting[0][1].paths.folder
                folder.chmod(folder.stat().st_mode)
            for item in [item for item in waiting if item[1].paths.result_pickle.exists()]:
                waiting.remove(item)
                done(item[0], _end_of(item[1]))
            now = time.monotonic()
            if waiting and now >= look:
                states = queue_states(sorted({job.job_id.split("_")[0] for _, job in waiting}))
                for item in list(waiting) if states is not None else []:
                    task, job = item
                    state = states.get(job.job_id)
                    if state is not None and state not in ENDED_STATES:
                        out_since.pop(job.job_id, None)  # (still, or again: requeued) in the queue
                    elif now - out_since.setdefault(job.job_id, now) >= grace and not job.paths.result_pickle.exists():
                        waiting.remove(item)
                        done(task, _lost(job, state))
                gap = min(2 * gap, most)
                pending = [out_since[job.job_id] + grace for _, job in waiting if job.job_id in out_since]
                look = min([now + gap, *pending])
            if waiting:
                time.sleep(RESULT_POLL_S)
