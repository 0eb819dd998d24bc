"""The GPU check: one command, sized for 9 minutes on one GPU, that says what a GPU does for this library.

Run it as ``iwae gpu-check --out DIR`` or ``benchmarks/gpu_check.sh DIR``; ``--smoke`` runs it at toy sizes on the
CPU, as the test suite does. Results and their conditions: docs/gpu.md.

It writes ``DIR/gpu-check.json`` and ``DIR/gpu-check.md`` with:

1. training steps on the device (:mod:`iwae.lab.bench.stacked`): one model's step at each k and minibatch, and the
   stacked step of a Table 1 column's models at each k (VAE and IWAE together), with the hours of Burda's exact
   minibatch-20 schedule (3,280 passes) per model and for the whole stacked column;
2. L_5000 seconds per 10,000 test images, and (after 3.) the NLL of a trained model on the device and on the CPU,
   from the same binarised images and the same noise (drawn once, on the CPU): the per-image differences are then
   rounding alone, and their mean must lie within :data:`AGREEMENT_STANDARD_ERRORS` standard errors of 0, plus
   :data:`ROUNDING_NATS`;
3. a full-schedule training of the MNIST one-layer Table 1 column (VAE k = 1, 5, 50; IWAE k = 5, 50), one stacked
   process per k, all at once on the device, at the minibatch the schedules study supports (the settings say
   which), each evaluated with L_5000 on the test set beside the paper's numbers. Training stops, checkpointed, at
   the time budget; the table then says how many passes each run got, which step each process ran (CUDA graphs, or
   eager after a refused capture) and, on CUDA, each process's peak memory.

The JSON and the summary are rewritten (atomically) after every phase, and a phase that fails is recorded in
``errors`` (its name and a one-line message) while the later phases still run: a crash, a CUDA error or the time
limit leaves what was measured before it.
"""

from __future__ import annotations

import contextlib
import json
import math
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

# The device and the CPU see the same images and noise, so the per-image NLL differences are rounding: their mean must
# lie within this many standard errors of 0, plus a float32 allowance (an L_5000 near 100 nats, summed over 784
# pixels in float32, differs by about 1e-5 relative between two correct implementations).
AGREEMENT_STANDARD_ERRORS = 4.0
ROUNDING_NATS = 1e-3
EVAL_BATCH = 100  # images per minibatch of L_k, as iwae eval takes them
WORKER_REPORT = "gpu-check worker: "  # the prefix of a training process's report line (JSON) in its log


@dataclass(frozen=True)
class CheckSettings:
    """What the check runs: the device, the time budget and each part's sizes (:func:`smoke_settings` for toys)."""

    device: str = "cuda"
    budget_seconds: float = 520.0  # the whole check, sized to end within 9 minutes
    # 1. training steps
    ks: tuple[int, ...] = (1, 5, 50)
    batches: tuple[int, ...] = (20, 100, 1000)
    repeats: int = 5
    # 2. evaluation
    eval_k: int = 5000
    timing_images: int = 1000  # L_k seconds are measured on these and scaled to 10,000
    agreement_images: int = 500
    # 3. the column's training
    column: tuple[tuple[str, int], ...] = (("vae", 1), ("vae", 5), ("iwae", 5), ("vae", 50), ("iwae", 50))
    train: dict[str, Any] = field(
        default_factory=lambda: {"schedule": "burda", "batch_schedule": "grow", "batch_size": 20}
    )
    eval_limit: int | None = None  # all 10,000 test images
    eval_reserve_seconds: float = 120.0  # kept from the training's time for the evaluations
    compile: bool = True  # the stacked steps through torch.compile (CUDA graphs on CUDA)
    smoke: bool = False


def smoke_settings(**changes: Any) -> CheckSettings:
    """Toy sizes on the CPU: every part of the check in well under a minute."""
    settings = CheckSettings(
        device="cpu",
        budget_seconds=300.0,
        ks=(1, 3),
        batches=(20,),
        repeats=1,
        eval_k=10,
        timing_images=20,
        agreement_images=20,
        column=(("vae", 1), ("vae", 3), ("iwae", 3)),
        train={"epochs": 1, "train_limit": 200, "valid_k": 5, "batch_size": 20},
        eval_limit=20,
        eval_reserve_seconds=30.0,
        compile=False,
        smoke=True,
    )
    return replace(settings, **changes)


def _environment(device: Any) -> dict[str, Any]:
    import torch

    from iwae import __version__

    info = {"iwae": __version__, "torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def _steps(settings: CheckSettings, images: Any) -> list[dict[str, Any]]:
    """Single steps at every (k, minibatch); the rows at minibatch 20 also time the stacked column at that k."""
    from iwae.lab.bench import stacked

    rows = []
    for batch in settings.batches:
        for k in settings.ks:
            models = sum(1 for _, column_k in settings.column if column_k == k) or 1
            small = batch == min(settings.batches)
            rows.append(
                stacked.measure(
                    images,
                    models=models,
                    k=k,
                    batch=batch,
                    compile_model=settings.compile and small,
                    repeats=settings.repeats,
                )
            )
    return rows


def _column_hours(rows: list[dict[str, Any]], settings: CheckSettings) -> dict[str, Any]:
    at_20 = [r for r in rows if r["batch"] == 20 and any(k == r["k"] for _, k in settings.column)]
    if not at_20:
        return {}
    stacked_ms = sum(r["stacked_ms"] for r in at_20)
    return {
        "column_stacked_step_ms": stacked_ms,
        "column_models": sum(r["models"] for r in at_20),
        "burda_schedule_hours_column_stacked": sum(r["burda_schedule_hours_stacked"] for r in at_20),
        "burda_schedule_hours_column_single": sum(r["burda_schedule_hours_single"] * r["models"] for r in at_20),
    }


def _evaluation_speed(settings: CheckSettings, dataset: Any, device: Any) -> dict[str, Any]:
    """L_k seconds per 10,000 test images on the device (Burda's one-layer model, freshly initialised)."""
    import torch

    from iwae.config import TrainConfig
    from iwae.evaluate import chunk_rows, estimate_log_likelihood
    from iwae.train import build_model

    model = build_model(TrainConfig(), dataset.train.images, device).eval()
    timing = dataset.test.subset(settings.timing_images).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = chunk_rows(device)
    # Warm up with one chunk of the timed pass's shape ([samples, images], as estimate_log_likelihood cuts them), so
    # that the first chunk's allocations (0.8 GB of logits on CUDA) fall outside the timed pass.
    chunk = max(1, min(settings.eval_k, rows // EVAL_BATCH))
    warm = timing.subset(min(EVAL_BATCH, len(timing)))
    estimate_log_likelihood(model, warm, dataset.binarization, chunk, generator, batch_size=EVAL_BATCH, max_rows=rows)
    sync()
    started = time.perf_counter()
    estimate_log_likelihood(
        model, timing, dataset.binarization, settings.eval_k, generator, batch_size=EVAL_BATCH, max_rows=rows
    )
    sync()
    seconds = time.perf_counter() - started
    return {
        "eval_k": settings.eval_k,
        "timed_images": settings.timing_images,
        "seconds_per_10000_images": seconds * 10_000 / settings.timing_images,
    }


def _agreement(settings: CheckSettings, dataset: Any, device: Any, run_dir: Path) -> dict[str, Any]:
    """The NLL of one trained model on the device and on the CPU, from the same binarised images and the same noise
    (both drawn once, on the CPU), so that the per-image differences are the devices' rounding alone: their mean must
    lie within :data:`AGREEMENT_STANDARD_ERRORS` standard errors of 0, plus :data:`ROUNDING_NATS`
    (:func:`_agreement_verdict`). A run directory without a model (its training failed or was killed before its
    first checkpoint) gives ``{"model": ..., "skipped": why}``."""
    import torch

    from iwae.runs import RunError, load_model

    if not run_dir.is_dir():
        return {"model": run_dir.name, "skipped": f"{run_dir} does not exist: the column's training did not start"}
    try:
        model, _ = load_model(run_dir, device)
        cpu_model, _ = load_model(run_dir, "cpu")
    except RunError as error:
        return {"model": run_dir.name, "skipped": _one_line(error)}
    images = dataset.test.subset(settings.agreement_images).images.cpu()
    fixed = torch.bernoulli(images, generator=torch.Generator().manual_seed(1))
    on_device, on_cpu = _paired_log_likelihoods(
        model, cpu_model, fixed, settings.eval_k, device, torch.Generator().manual_seed(2)
    )
    return {
        "model": run_dir.name,
        "images": len(fixed),
        "eval_k": settings.eval_k,
        "noise": "shared: drawn once on the CPU",
        **_agreement_verdict(on_device, on_cpu),
    }


def _paired_log_likelihoods(
    model: Any, cpu_model: Any, x: Any, k: int, device: Any, generator: Any, batch_size: int = EVAL_BATCH
) -> tuple[Any, Any]:
    """Per-image L_k (float64 ``[n]``, on the CPU) of ``model`` on ``device`` and of ``cpu_model`` on the CPU, for
    the binarised images ``x`` (on the CPU) and the same standard-normal noise, drawn on the CPU from ``generator``
    in chunks of the device's size (:func:`iwae.evaluate.chunk_rows`); the CPU takes each chunk in its own size."""
    import torch

    from iwae.bounds import LogMeanExpAccumulator
    from iwae.evaluate import chunk_rows

    device_chunk = max(1, min(k, chunk_rows(device) // batch_size))
    cpu_chunk = max(1, min(k, chunk_rows(torch.device("cpu")) // batch_size))
    on_device, on_cpu = [], []
    with torch.no_grad():
        for start in range(0, x.shape[0], batch_size):
            x_cpu = x[start : start + batch_size]
            x_device = x_cpu.to(device)
            device_total, cpu_total = LogMeanExpAccumulator(), LogMeanExpAccumulator()
            for done in range(0, k, device_chunk):
                noise = cpu_model.draw_noise(x_cpu, min(device_chunk, k - done), generator)
                device_total.add(model.sample_with_noise(x_device, [n.to(device) for n in noise]).log_w)
                for part in zip(*(n.split(cpu_chunk) for n in noise), strict=True):
                    cpu_total.add(cpu_model.sample_with_noise(x_cpu, list(part)).log_w)
            on_device.append(device_total.result().cpu())
            on_cpu.append(cpu_total.result())
    return torch.cat(on_device), torch.cat(on_cpu)


def _agreement_verdict(on_device: Any, on_cpu: Any) -> dict[str, Any]:
    """The paired test of two per-image L_k ``[n]`` from the same images and noise: the NLLs, the mean of the
    per-image differences (device minus CPU, in NLL), its standard error, the largest per-image difference, the
    tolerance (:data:`AGREEMENT_STANDARD_ERRORS` standard errors plus :data:`ROUNDING_NATS`) and whether the mean
    difference lies within it."""
    difference = (on_cpu.double() - on_device.double()).cpu()  # NLL on the device minus NLL on the CPU
    n = difference.numel()
    mean = difference.mean().item()
    standard_error = difference.std(correction=1).item() / math.sqrt(n) if n > 1 else 0.0
    tolerance = AGREEMENT_STANDARD_ERRORS * standard_error + ROUNDING_NATS
    return {
        "nll_device": -on_device.double().mean().item(),
        "nll_cpu": -on_cpu.double().mean().item(),
        "mean_difference": mean,
        "standard_error": standard_error,
        "max_abs_difference": difference.abs().max().item(),
        "tolerance": tolerance,
        "agree": bool(abs(mean) <= tolerance),
    }


def _column_configs(settings: CheckSettings) -> dict[int, list[dict[str, Any]]]:
    by_k: dict[int, list[dict[str, Any]]] = {}
    for objective, k in settings.column:
        by_k.setdefault(k, []).append(
            {"dataset": "mnist", "layers": 1, "objective": objective, "k": k, **settings.train}
        )
    return by_k


def _worker_report(results: list[Any], device: Any) -> dict[str, Any]:
    """What a training process tells the check: each run's step (``FitResult.gradients``: CUDA graphs, or eager and
    why) and, on CUDA, the process's peak memory (``max_memory_gb``, omitted elsewhere)."""
    import torch

    report: dict[str, Any] = {"gradients": {Path(r.run_dir).name: r.gradients for r in results}}
    if device.type == "cuda":
        report["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return report


def _read_worker_report(log_path: Path) -> dict[str, Any]:
    """The last report line (:data:`WORKER_REPORT`) a training process printed into its log; ``{}`` if none."""
    report: dict[str, Any] = {}
    if log_path.is_file():
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith(WORKER_REPORT):
                with contextlib.suppress(ValueError):
                    report = json.loads(line[len(WORKER_REPORT) :])
    return report


def train_worker(spec_json: str) -> None:
    """One stacked process of the column's training, run by :func:`_train_column` as a subprocess.

    It prints its report (:func:`_worker_report`) after the training and again after the evaluations.
    """
    import torch

    from iwae.config import build_train_config
    from iwae.evaluate import evaluate_run
    from iwae.runs import resolve_device
    from iwae.train import fit_runs

    spec = json.loads(spec_json)
    configs = [build_train_config(options) for options in spec["options"]]
    dirs = [Path(d) for d in spec["dirs"]]
    resume = any((d / "config.json").is_file() for d in dirs)
    results = fit_runs(
        configs, dirs, resume=resume, device=spec["device"], data_dir=spec["data_dir"], progress=False,
        compile_model=spec["compile"], deadline=time.monotonic() + spec["train_seconds"],
        checkpoint_minutes=10.0, stack="on",
    )  # fmt: skip
    device = resolve_device(spec["device"])
    print(WORKER_REPORT + json.dumps(_worker_report(results, device)), flush=True)
    for run_dir in dirs:
        evaluate_run(
            run_dir, k=spec["eval_k"], limit=spec["eval_limit"], device=spec["device"], data_dir=spec["data_dir"],
            progress=False, prune_inactive=False,
        )  # fmt: skip
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(WORKER_REPORT + json.dumps(_worker_report(results, device)), flush=True)


def _train_column(settings: CheckSettings, out: Path, data_dir: str | None, seconds_left: float) -> dict[str, Any]:
    from iwae.config import build_train_config
    from iwae.lab.reports.published import PUBLISHED_TABLE1
    from iwae.runs import read_metrics

    train_seconds = max(10.0, seconds_left - settings.eval_reserve_seconds)
    processes = []
    for k, options in _column_configs(settings).items():
        dirs = [str(out / "column" / f"{o['objective']}-k{k}") for o in options]
        spec = {
            "options": options, "dirs": dirs, "device": settings.device, "data_dir": data_dir,
            "compile": settings.compile, "train_seconds": train_seconds, "eval_k": settings.eval_k,
            "eval_limit": settings.eval_limit,
        }  # fmt: skip
        command = [sys.executable, "-m", "iwae.lab.gpu_check", json.dumps(spec)]
        log_path = out / f"column-k{k}.log"
        log_path.unlink(missing_ok=True)  # a fresh file: "x" creates it exclusively, never through a planted link
        log = open(log_path, "x")  # noqa: SIM115 (closed below)
        processes.append((k, subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log))
    started = time.perf_counter()
    failures = {}
    for k, process, log in processes:
        try:
            code = process.wait(timeout=max(1.0, seconds_left + 60 - (time.perf_counter() - started)))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            code = "killed at the time limit"
        log.close()
        if code != 0:
            failures[k] = f"exit {code}; see column-k{k}.log"
    workers = {k: _read_worker_report(out / f"column-k{k}.log") for k, _, _ in processes}
    rows = []
    for k, options in _column_configs(settings).items():
        for o in options:
            run_dir = out / "column" / f"{o['objective']}-k{k}"
            config = build_train_config(o)
            metrics = read_metrics(run_dir) if run_dir.is_dir() else []
            evaluation = json.loads((run_dir / "eval.json").read_text()) if (run_dir / "eval.json").is_file() else {}
            paper = PUBLISHED_TABLE1.get(("mnist", 1, k, o["objective"]))
            rows.append(
                {
                    "objective": o["objective"],
                    "k": k,
                    "passes": len(metrics),
                    "passes_scheduled": config.total_epochs,
                    "train_seconds": sum(m["seconds"] for m in metrics),
                    "nll": evaluation.get("nll"),
                    "eval_examples": evaluation.get("n_examples"),
                    "paper_nll": paper[0] if paper else None,
                    "eval_seconds": evaluation.get("seconds"),
                    "gradients": workers.get(k, {}).get("gradients", {}).get(run_dir.name),
                }
            )
    return {
        "settings": settings.train,
        "wall_seconds": time.perf_counter() - started,
        "runs": rows,
        "failures": failures,
        # per k, the process's report: its runs' steps and, on CUDA, its peak memory ({} if it printed none)
        "workers": workers,
    }


def run_check(settings: CheckSettings, out: str | Path, data_dir: str | None = None) -> dict[str, Any]:
    """Run the check and return its JSON object.

    ``gpu-check.json`` and ``gpu-check.md`` are rewritten in ``out`` after every phase, atomically, so an
    interruption leaves the last complete pair. Each phase (``steps``, ``column_hours``, ``evaluation``, ``column``,
    ``agreement``) runs in a guard: one that raises leaves its entry ``None``, adds ``{"phase": ..., "error": one
    line}`` to ``errors``, and the check goes on with the next.

    Args:
        settings: :class:`CheckSettings` (:func:`smoke_settings` for toy sizes).
        out: the folder, created if missing; the column's runs go under ``out/column``.
        data_dir: where MNIST is looked for (:func:`iwae.data.load_dataset`).
    """
    from iwae.data import load_dataset
    from iwae.runs import resolve_device

    started = time.perf_counter()
    device = resolve_device(settings.device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "settings": asdict(settings),
        "environment": _environment(device),
        "errors": [],
        **dict.fromkeys(("steps", "column_hours", "evaluation", "column", "agreement")),
    }

    def phase(name: str, run: Any) -> None:
        try:
            result[name] = run()
        except Exception as error:  # recorded; the next phases still run
            result["errors"].append({"phase": name, "error": _one_line(error)})
        finally:  # after a KeyboardInterrupt too: what was measured is kept
            _write(result, out, device, started)

    _write(result, out, device, started)
    dataset = load_dataset("mnist", data_dir, progress=False)
    phase("steps", lambda: _steps(settings, dataset.train.images[:1000].to(device)))
    if result["steps"] is not None:
        phase("column_hours", lambda: _column_hours(result["steps"], settings))
    phase("evaluation", lambda: _evaluation_speed(settings, dataset, device))
    seconds_left = settings.budget_seconds - (time.perf_counter() - started)
    phase("column", lambda: _train_column(settings, out, data_dir, seconds_left))
    first = out / "column" / "{}-k{}".format(*settings.column[0])
    phase("agreement", lambda: _agreement(settings, dataset, device, first))
    return result


def _one_line(error: BaseException) -> str:
    """``Type: the message's first line`` (at most 300 characters)."""
    message = str(error).strip().splitlines()
    return f"{type(error).__name__}: {message[0][:300]}" if message else type(error).__name__


def _write(result: dict[str, Any], out: Path, device: Any, started: float) -> None:
    """Rewrite ``gpu-check.json`` and ``gpu-check.md`` atomically with what ``result`` holds so far."""
    import torch

    from iwae.checkpoint import atomic_write_text

    result["seconds"] = time.perf_counter() - started
    if device.type == "cuda":
        with contextlib.suppress(RuntimeError):  # a CUDA error earlier can make any CUDA call fail
            result["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9  # this process's only
    atomic_write_text(out / "gpu-check.json", json.dumps(result, indent=2, default=str) + "\n")
    atomic_write_text(out / "gpu-check.md", markdown(result))


def _number(value: Any, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    """The check's summary in Markdown.

    Environment, step table, evaluation, the column beside the paper, and the phases that failed. A phase not
    reached or failed reads "not measured".
    """
    from iwae.lab.bench.stacked import markdown as steps_table

    env = result["environment"]
    missing = "Not measured (see Errors)."
    lines = [
        "# GPU check",
        "",
        f"{env.get('gpu', env['device'])}, torch {env['torch']}"
        + (f", CUDA {env['cuda']}" if env.get("cuda") else "")
        + f", iwae {env['iwae']}; {result['seconds']:.0f} s in all"
        + (f"; peak memory of this process {result['max_memory_gb']:.2f} GB." if "max_memory_gb" in result else "."),
        "",
        "## Training steps",
        "",
        steps_table(result["steps"]) if result.get("steps") is not None else missing,
    ]
    hours = result.get("column_hours")
    if hours:
        lines += [
            f"Stacked step of the whole one-layer column at minibatch 20 ({hours['column_models']} models): "
            f"{hours['column_stacked_step_ms']:.3f} ms. Burda's exact schedule (3,280 passes at minibatch 20): "
            f"{hours['burda_schedule_hours_column_stacked']:.2f} h for the stacked column, "
            f"{hours['burda_schedule_hours_column_single']:.2f} h for its models one at a time.",
            "",
        ]
    ev, agreement = result.get("evaluation"), result.get("agreement")
    lines += ["## Evaluation", ""]
    if ev:
        lines.append(
            f"L_{ev['eval_k']}: {ev['seconds_per_10000_images']:.1f} s per 10,000 test images (timed on "
            f"{ev['timed_images']:,})."
        )
    else:
        lines.append(missing)
    if agreement and "skipped" in agreement:
        lines.append(f"Device against CPU: skipped ({agreement['skipped']}).")
    elif agreement:
        lines.append(
            f"The trained {agreement['model']} on the same {agreement['images']} binarised test images and the same "
            f"noise (drawn on the CPU): NLL {agreement['nll_device']:.4f} on the device, {agreement['nll_cpu']:.4f} "
            f"on the CPU; mean paired difference {agreement['mean_difference']:.2e} nats, standard error "
            f"{agreement['standard_error']:.1e}, largest per image {agreement['max_abs_difference']:.1e}: "
            f"{'within' if agreement['agree'] else 'NOT within'} {agreement['tolerance']:.1e} "
            f"({AGREEMENT_STANDARD_ERRORS:g} standard errors + {ROUNDING_NATS:g})."
        )
    column = result.get("column")
    lines += ["", "## The one-layer MNIST column, stacked, beside the paper", ""]
    if column is None:
        lines.append(missing)
    else:
        lines += [
            f"Settings: `{json.dumps(column['settings'])}`; wall time {column['wall_seconds']:.0f} s "
            "(one stacked process per k, all at once).",
            "",
            "| objective | k | passes | train s | test NLL | examples | paper |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for r in column["runs"]:
            lines.append(
                f"| {r['objective']} | {r['k']} | {r['passes']} of {r['passes_scheduled']} "
                f"| {_number(r['train_seconds'], 0)} | {_number(r['nll'])} | {r['eval_examples'] or '—'} "
                f"| {_number(r['paper_nll'])} |"
            )
        lines.append("")
        for k, report in column.get("workers", {}).items():
            steps = sorted(set(report.get("gradients", {}).values())) or ["no report (see its log)"]
            memory = f"; peak memory {report['max_memory_gb']:.2f} GB" if "max_memory_gb" in report else ""
            lines.append(f"- k = {k}: {'; '.join(steps)}{memory}")
        if column["failures"]:
            lines += ["", "Failures: " + "; ".join(f"k = {k}: {why}" for k, why in column["failures"].items())]
    if result.get("errors"):
        lines += ["", "## Errors", ""] + [f"- {e['phase']}: {e['error']}" for e in result["errors"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # a stacked training process of the column (see _train_column)
    train_worker(sys.argv[1])
