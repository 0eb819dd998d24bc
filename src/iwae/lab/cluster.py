"""Sweeps on a cluster through submitit: each phase of a grid becomes one Slurm job array.

``iwae sweep GRID --out DIR --executor slurm`` runs :func:`iwae.lab.sweep.run_sweep` with a
:class:`SubmititRunner`. Each of a phase's tasks (one run, or one stack of runs) becomes one task of a job array
(submitit's ``map_array``), with the partition, time limit, GPUs per task and array parallelism of
:class:`ClusterOptions`. On a node, a task runs :func:`iwae.lab.runner.run_task`: it takes the run's lock, trains
and evaluates, and writes each run's row to ``runs/NAME/result.json``; it never opens the SQLite file.

The submitting sweep waits for the array, indexes the result files into ``DIR/results.sqlite`` (the database's
one writer) and goes on to the next phase, which may start from this one's runs (``init_from``). If the sweep
stops (Ctrl-C, an error) it cancels its jobs; if it is killed outright they run on, and
``iwae results DIR --rescan`` indexes what they wrote. Submitit's own files (the pickled tasks, each job's
stdout and stderr) go to ``DIR/submitit/``.

``DIR`` must be on a file system that the nodes share with the submitting machine, and the nodes must run the
same installation of this package. ``engine = "local"`` or ``"debug"`` runs the same tasks on this machine,
through submitit's local (a process per task) and debug (in this process) executors: the tests do.

submitit is an optional dependency (``pip install 'iwae[cluster]'``), imported when a runner first runs.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from iwae.lab.runner import Task, TaskEnd, run_task

SUBMITIT_SUBDIR = "submitit"
ENGINES = ("slurm", "local", "debug")


@dataclass(frozen=True)
class ClusterOptions:
    """How the tasks are submitted.

    Fields: Slurm's ``partition`` (None: the cluster's default), each task's ``time_limit_min`` in minutes,
    ``gpus_per_task``, ``array_parallelism`` (how many tasks of an array run at once) and submitit's ``engine``
    (one of :data:`ENGINES`).
    """

    partition: str | None = None
    time_limit_min: int = 24 * 60
    gpus_per_task: int = 0
    array_parallelism: int = 64
    engine: str = "slurm"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        for name, low in (("time_limit_min", 1), ("gpus_per_task", 0), ("array_parallelism", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a whole number >= {low}, got {value!r}")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


class SubmititRunner:
    """A runner for :func:`~iwae.lab.sweep.run_sweep`: a phase's tasks as one job array, waited for.

    Made before the sweep starts, it checks at once that submitit is installed and, for Slurm, that this machine
    can submit (``srun`` on the ``PATH``); if not, a one-line ``ValueError``, nothing written. Its files go to
    ``DIR/submitit/`` of the sweep's folder.
    """

    def __init__(self, options: ClusterOptions | None = None) -> None:
        self.options = options or ClusterOptions()
        try:
            import submitit  # noqa: F401  deferred on purpose: an optional dependency, needed only here
        except ImportError:
            raise ValueError("--executor slurm needs submitit: pip install 'iwae[cluster]'") from None
        if self.options.engine == "slurm" and shutil.which("srun") is None:
            raise ValueError("--executor slurm: no Slurm here (no srun on the PATH); run the sweep on a login node")

    def executor(self, folder: Path):
        """A submitit executor set up from the options, keeping its files in ``folder`` (created)."""
        import submitit  # deferred on purpose, as above

        executor = submitit.AutoExecutor(folder=folder, cluster=self.options.engine)
        executor.update_parameters(
            name="iwae-sweep",
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
        try:
            jobs = executor.map_array(run_task, tasks)
        except Exception as error:  # sbatch refused the array: a partition or time limit the cluster does not have
            raise ValueError(f"submitting the sweep's tasks failed: {_first_line(error)}") from None
        try:
            for task in tasks:
                started(task)
            for task, job in zip(tasks, jobs, strict=True):
                try:
                    end = job.result()
                except Exception as error:  # the job failed, timed out or was cancelled: no result from it
                    end = TaskEnd(error=f"cluster job {job.job_id}: {_first_line(error)}")
                done(task, end)
        except BaseException:  # the sweep stops (Ctrl-C, an error): so do its jobs
            for job in jobs:
                job.cancel(check=False)
            raise
