"""``iwae sweep --executor slurm`` against a real Slurm cluster, and every way Slurm refuses a sweep.

The cluster is the single node that ``scripts/slurm-cluster.sh start`` runs on this machine (``.ci/run`` starts it
and sets ``IWAE_SLURM_REQUIRED=1``, which turns the skip below into a failure); it has no accounting database, so
``sacct`` fails there as on many small clusters, and the sweep must follow its tasks through ``squeue`` alone.
Elsewhere the tests that need Slurm are skipped, saying why.

- A sweep of three tiny runs goes to Slurm as one job array; one task is cancelled with ``scancel`` before it
  starts. The sweep notices that the task left the queue without a result and records its run failed (exit 1);
  the same command again runs that run alone, and ``iwae results`` lists each run once, every one finished, with the
  results that the tasks wrote and the sweep indexed.
- A sweep that Slurm would refuse (unknown partition, GPUs the cluster lacks, a time limit above the partition's,
  no controller) stops with one line on stderr and exit code 2, no traceback, and nothing written.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from tiny_runs import TINY as LAB_TINY
from trees import assert_refused, snapshot

from iwae.cli import main
from iwae.lab.cluster import JOB_NAME, SUBMITIT_SUBDIR, partition_time_limit
from iwae.lab.run import RESULT_FILE
from iwae.lab.store import ResultStore

pytest.importorskip("submitit")

IWAE = [sys.executable, "-m", "iwae"]
TINY = {**LAB_TINY, "epochs": 1, "k": 2}  # the lab's tiny run, one pass
SEEDS = [0, 1, 2]  # three runs: the array's tasks 0 and 1 start at once, task 2 waits for one of them (%2)
SWEEP = ["--executor", "slurm", "--time-limit", "10", "--array-parallelism", "2", "--device", "cpu", "--stack", "off"]
SWEEP_TIMEOUT_S = 600  # a sweep that has not ended by then hangs
FIELDS = "%i|%T|%j|%P|%l|%M"  # squeue: a task's id, state, name, partition and time limit; the time it ran


def slurm_missing() -> str | None:
    """Why the Slurm tests cannot run here (None: a Slurm controller answers and a node is up)."""
    for tool in ("srun", "sbatch", "squeue", "scontrol", "sinfo", "scancel"):
        if shutil.which(tool) is None:
            return f"no {tool} on the PATH (start a cluster with scripts/slurm-cluster.sh, as root)"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=60, check=False)
    if ping.returncode != 0:
        return "no Slurm controller answers 'scontrol ping' (scripts/slurm-cluster.sh start; export SLURM_CONF)"
    nodes = subprocess.run(["sinfo", "--noheader", "--format=%t"], capture_output=True, text=True, timeout=60)
    if not {"idle", "mix", "alloc"} & set(nodes.stdout.split()):
        return f"no Slurm node takes jobs (sinfo: {nodes.stdout.split()})"
    return None


def needs_slurm() -> None:
    """Skip the test where Slurm is not running; fail it instead where CI set IWAE_SLURM_REQUIRED=1."""
    reason = slurm_missing()
    if reason is None:
        return
    if os.environ.get("IWAE_SLURM_REQUIRED") == "1":
        pytest.fail(f"IWAE_SLURM_REQUIRED=1 but {reason}")
    pytest.skip(reason)


def _toml(grid: dict) -> str:
    lines = []
    for table, values in grid.items():
        lines.append(f"[{table}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"


def squeue(job_id: str, fields: str = "%i|%T") -> dict[str, list[str]]:
    """Slurm's view of job ``job_id``'s tasks (ended ones too, while the controller keeps them): task id -> fields."""
    completed = subprocess.run(
        ["squeue", "--noheader", "--array", "--states=all", f"--jobs={job_id}", f"--format={fields}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    rows = [line.strip().split("|") for line in completed.stdout.splitlines() if line.strip()]
    return {row[0]: row[1:] for row in rows}


def wait_for(what: str, probe: Callable[[], object], seconds: float = 180) -> object:
    """Poll ``probe`` until it returns something true; fail naming ``what`` after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {seconds} s")


# -- a sweep on Slurm ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_sweep_runs_as_a_slurm_array_a_cancelled_task_is_recorded_and_rerun_and_each_run_is_listed_once(
    tmp_path: Path,
) -> None:
    needs_slurm()
    grid, out = tmp_path / "grid.toml", tmp_path / "sweep"
    grid.write_text(_toml({"fixed": TINY, "axes": {"seed": SEEDS}}))
    command = [*IWAE, "sweep", str(grid), "--out", str(out), *SWEEP, "--no-progress"]
    log = []  # the closing excerpt: job ids, states, times
    started = time.monotonic()
    sweep = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        script = wait_for(
            "the sweep's submission script in DIR/submitit",
            lambda: sorted((out / SUBMITIT_SUBDIR).glob("*_submission.sh")) if sweep.poll() is None else ["ended"],
        )
        assert sweep.poll() is None, sweep.communicate()
        (script,) = script
        array = script.name.removesuffix("_submission.sh")
        # The array waits on the %2 throttle until one of the first two tasks ends: cancel it there.
        state = squeue(array).get(f"{array}_2")
        subprocess.run(["scancel", f"{array}_2"], check=True, timeout=60)
        log.append(f"array {array}: cancelled task {array}_2 (it was {state[0] if state else 'not listed'})")
        stdout, stderr = sweep.communicate(timeout=SWEEP_TIMEOUT_S)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.communicate()
    log.append(f"first sweep: exit {sweep.returncode} after {time.monotonic() - started:.0f} s")
    assert sweep.returncode == 1, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert (summary["runs"], summary["ran"], summary["busy"], summary["diverged"]) == (3, 3, {}, {}), summary
    ((lost, reason),) = summary["failed"].items()
    assert re.search(rf"cluster job {array}_2 ended without a result \((CANCELLED|no longer in the queue)\)", reason)
    assert stderr.strip().splitlines()[-1].startswith(f"sweep {out}: of 3 runs, 1 failed ({lost})"), stderr
    assert "Traceback" not in stderr and "sacct" not in stderr  # squeue told the sweep, not sacct

    # Slurm ran the sweep's options: one array of three tasks, two of them completed, the third never ran.
    assert "#SBATCH --array=0-2%2\n" in script.read_text()
    tasks = squeue(array, FIELDS)
    log += [f"  {task}: {' '.join(fields)}" for task, fields in sorted(tasks.items())]
    tasks = {task: fields[:4] for task, fields in tasks.items()}
    partitions = subprocess.run(["sinfo", "--noheader", "--format=%P"], capture_output=True, text=True, timeout=60)
    default = next(name.rstrip("*") for name in partitions.stdout.split() if name.endswith("*"))
    for index in (0, 1):
        assert tasks[f"{array}_{index}"] == ["COMPLETED", JOB_NAME, default, "10:00"], tasks
    assert tasks.get(f"{array}_2", ["CANCELLED"])[0] == "CANCELLED", tasks
    store = ResultStore.in_dir(out)
    status = {row["name"]: row["status"] for row in store.rows()}
    assert status == {**dict.fromkeys(status, "finished"), lost: "failed"} and len(status) == 3, status
    assert not (out / "runs" / lost / RESULT_FILE).exists()

    started = time.monotonic()
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=SWEEP_TIMEOUT_S)
    log.append(f"second sweep: exit {again.returncode} after {time.monotonic() - started:.0f} s")
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert (summary["ran"], summary["skipped"], summary["failed"]) == (1, 2, {}), summary
    for path in (out / SUBMITIT_SUBDIR).glob("*_submission.sh"):
        if path != script:  # the second sweep's job: the one run
            log += [f"  {task}: {' '.join(fields)}" for task, fields in squeue(path.name.split("_")[0], FIELDS).items()]

    listed = subprocess.run([*IWAE, "results", str(out)], capture_output=True, text=True, timeout=120, check=True)
    runs = json.loads(listed.stdout)["runs"]
    assert sorted(run["name"] for run in runs) == sorted(status), runs  # each run once
    assert {run["status"] for run in runs} == {"finished"}
    for row in ResultStore.in_dir(out).rows():  # what the tasks wrote is what the sweep indexed
        written = json.loads((out / "runs" / row["name"] / RESULT_FILE).read_text())
        assert written["eval"] == row["eval"] and written["status"] == "finished"
    accounting = subprocess.run(["sacct", "-j", array], capture_output=True, text=True, timeout=60, check=False)
    log.append(f"accounting: {'on' if accounting.returncode == 0 else 'off (' + accounting.stderr.strip() + ')'}")
    print("\n".join(log))


# -- refusals: one line, exit code 2, nothing written ---------------------------------------------------------------
def _no_slurm(work: Path, env: pytest.MonkeyPatch) -> list[str]:
    (work / "bin").mkdir()
    env.setenv("PATH", str(work / "bin"))
    return []


def _no_configuration(work: Path, env: pytest.MonkeyPatch) -> list[str]:
    if shutil.which("scontrol") is None:
        pytest.skip("Slurm is not installed here")
    if Path("/etc/slurm/slurm.conf").exists():
        pytest.skip("this machine has /etc/slurm/slurm.conf: Slurm finds its configuration without SLURM_CONF")
    env.delenv("SLURM_CONF", raising=False)
    return []


def _dead_controller(work: Path, env: pytest.MonkeyPatch) -> list[str]:
    """A copy of this cluster's configuration with a controller port that nothing listens on."""
    needs_slurm()
    conf = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf"))
    text = re.sub(r"(?m)^SlurmctldPort=.*$", "", conf.read_text())
    (work / "dead").mkdir()
    (work / "dead" / "slurm.conf").write_text(f"{text}\nSlurmctldPort=6899\n")
    env.setenv("SLURM_CONF", str(work / "dead" / "slurm.conf"))
    return []


def _on_the_cluster(*flags: str) -> Callable[[Path, pytest.MonkeyPatch], list[str]]:
    def setup(work: Path, env: pytest.MonkeyPatch) -> list[str]:
        needs_slurm()
        return list(flags)

    return setup


def _above_the_time_limit(work: Path, env: pytest.MonkeyPatch) -> list[str]:
    """A minute more than the default partition's time limit (as sinfo gives it)."""
    needs_slurm()
    limit = partition_time_limit(None)
    if limit is None:
        pytest.skip("the default partition has no time limit")
    return ["--time-limit", str(limit[1] + 1)]


@dataclass(frozen=True)
class Refusal:
    name: str
    setup: Callable[[Path, pytest.MonkeyPatch], list[str]]  # given the work folder; returns the sweep's flags
    expect: str  # a fragment of the one-line message


REFUSALS = [
    Refusal("no-slurm", _no_slurm, "no srun on the PATH"),
    Refusal("no-configuration", _no_configuration, "controller does not answer"),
    Refusal("controller-down", _dead_controller, "controller does not answer"),
    Refusal("unknown-partition", _on_the_cluster("--partition", "no-such-partition"), "would refuse the sweep's jobs"),
    Refusal("gpus-the-nodes-lack", _on_the_cluster("--gpus-per-task", "64"), "would refuse the sweep's jobs"),
    Refusal("time-limit-above-the-partitions", _above_the_time_limit, "above partition"),
]


@pytest.mark.parametrize("case", REFUSALS, ids=[case.name for case in REFUSALS])
def test_a_sweep_slurm_would_refuse_says_one_line_exits_2_and_writes_nothing(
    case: Refusal, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    grid = work / "grid.toml"
    grid.write_text(_toml({"fixed": TINY}))
    flags = case.setup(work, monkeypatch)
    before = snapshot(tmp_path)
    capsys.readouterr()
    code = main(["sweep", str(grid), "--out", str(work / "sweep"), "--executor", "slurm", *flags, "--no-progress"])
    assert_refused(code, *capsys.readouterr(), case.expect)
    assert snapshot(tmp_path) == before
