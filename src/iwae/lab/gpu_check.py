"""The GPU check: one command, sized for 9 minutes on one GPU, that says what a GPU does for this library
(``iwae gpu-check --out DIR``, or ``benchmarks/gpu_check.sh DIR``; ``--smoke`` runs it at toy sizes on the CPU, as
the test suite does, so it cannot rot).

It writes ``DIR/gpu-check.json`` and ``DIR/gpu-check.md`` with:

1. training steps on the device (:mod:`iwae.lab.bench.stacked`): one model's step at each k and minibatch, and the
   stacked step of a Table 1 column's models at each k (VAE and IWAE together), with the hours of Burda's exact
   minibatch-20 schedule (3,280 passes) per model and for the whole stacked column;
2. L_5000 seconds per 10,000 test images, and (after 3.) the NLL of a trained model on the same binarised images
   on the device and on the CPU (they must agree within 0.01 nats);
3. a full-schedule training of the MNIST one-layer Table 1 column (VAE k = 1, 5, 50; IWAE k = 5, 50), one stacked
   process per k, all at once on the device, at the minibatch the schedules study supports (the settings say
   which), each evaluated with L_5000 on the test set beside the paper's numbers. Training stops, checkpointed, at
   the time budget; the table then says how many passes each run got.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

AGREEMENT_NATS = 0.01


@dataclass(frozen=True)
class CheckSettings:
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
    estimate_log_likelihood(model, timing.subset(2), dataset.binarization, 2, generator)  # warm up
    sync()
    started = time.perf_counter()
    estimate_log_likelihood(
        model, timing, dataset.binarization, settings.eval_k, generator, max_rows=chunk_rows(device)
    )
    sync()
    seconds = time.perf_counter() - started
    return {
        "eval_k": settings.eval_k,
        "timed_images": settings.timing_images,
        "seconds_per_10000_images": seconds * 10_000 / settings.timing_images,
    }


def _agreement(settings: CheckSettings, dataset: Any, device: Any, run_dir: Path) -> dict[str, Any]:
    """The NLL of one trained model on the same binarised images (drawn once, on the CPU) on the device and on the
    CPU: they must agree within :data:`AGREEMENT_NATS`."""
    import torch

    from iwae.data import Split
    from iwae.evaluate import chunk_rows, estimate_log_likelihood
    from iwae.runs import load_model

    model, _ = load_model(run_dir, device)
    images = dataset.test.subset(settings.agreement_images).images
    fixed = Split(torch.bernoulli(images, generator=torch.Generator().manual_seed(1)))
    on_device = estimate_log_likelihood(
        model, fixed.to(device), "fixed", settings.eval_k, torch.Generator(device=device).manual_seed(2),
        max_rows=chunk_rows(device),
    )["log_lik"]  # fmt: skip
    cpu_model, _ = load_model(run_dir, "cpu")
    on_cpu = estimate_log_likelihood(cpu_model, fixed, "fixed", settings.eval_k, torch.Generator().manual_seed(3))
    difference = abs(on_device.mean().item() - on_cpu["log_lik"].mean().item())
    return {
        "model": run_dir.name,
        "images": settings.agreement_images,
        "nll_device": -on_device.mean().item(),
        "nll_cpu": -on_cpu["log_lik"].mean().item(),
        "nll_difference": difference,
        "agree": difference <= AGREEMENT_NATS,
    }


def _column_configs(settings: CheckSettings) -> dict[int, list[dict[str, Any]]]:
    by_k: dict[int, list[dict[str, Any]]] = {}
    for objective, k in settings.column:
        by_k.setdefault(k, []).append(
            {"dataset": "mnist", "layers": 1, "objective": objective, "k": k, **settings.train}
        )
    return by_k


def train_worker(spec_json: str) -> None:
    """One stacked process of the column's training (run by :func:`_train_column` as a subprocess)."""
    import torch

    from iwae.config import build_train_config
    from iwae.evaluate import evaluate_run
    from iwae.stacked import fit_stacked

    spec = json.loads(spec_json)
    configs = [build_train_config(options) for options in spec["options"]]
    dirs = [Path(d) for d in spec["dirs"]]
    resume = any((d / "config.json").is_file() for d in dirs)
    fit_stacked(
        configs, dirs, resume=resume, device=spec["device"], data_dir=spec["data_dir"], progress=False,
        compile_model=spec["compile"], deadline=time.monotonic() + spec["train_seconds"],
        checkpoint_minutes=10.0,
    )  # fmt: skip
    for run_dir in dirs:
        evaluate_run(
            run_dir, k=spec["eval_k"], limit=spec["eval_limit"], device=spec["device"], data_dir=spec["data_dir"],
            progress=False, prune_inactive=False,
        )  # fmt: skip
    if spec["device"].startswith("cuda"):
        torch.cuda.synchronize()


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
            code = "killed at the time limit"
        log.close()
        if code != 0:
            failures[k] = f"exit {code}; see column-k{k}.log"
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
                }
            )
    return {
        "settings": settings.train,
        "wall_seconds": time.perf_counter() - started,
        "runs": rows,
        "failures": failures,
    }


def run_check(settings: CheckSettings, out: str | Path, data_dir: str | None = None) -> dict[str, Any]:
    """Run the check; write ``gpu-check.json`` and ``gpu-check.md`` into ``out``; return the JSON object."""
    import torch

    from iwae.checkpoint import atomic_write_text
    from iwae.data import load_dataset
    from iwae.runs import resolve_device

    started = time.perf_counter()
    device = resolve_device(settings.device)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset("mnist", data_dir, progress=False)
    result: dict[str, Any] = {"settings": asdict(settings), "environment": _environment(device)}
    images = dataset.train.images[:1000].to(device)
    result["steps"] = _steps(settings, images)
    result["column_hours"] = _column_hours(result["steps"], settings)
    result["evaluation"] = _evaluation_speed(settings, dataset, device)
    seconds_left = settings.budget_seconds - (time.perf_counter() - started)
    result["column"] = _train_column(settings, out, data_dir, seconds_left)
    first = out / "column" / "{}-k{}".format(*settings.column[0])
    result["agreement"] = _agreement(settings, dataset, device, first) if first.is_dir() else None
    result["seconds"] = time.perf_counter() - started
    if device.type == "cuda":
        result["max_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    atomic_write_text(out / "gpu-check.json", json.dumps(result, indent=2) + "\n")
    atomic_write_text(out / "gpu-check.md", markdown(result))
    return result


def _number(value: Any, digits: int = 2) -> str:
    return "—" if value is None else f"{value:,.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    """The check's summary as a reader wants it: environment, step table, evaluation, the column beside the paper."""
    from iwae.lab.bench.stacked import markdown as steps_table

    env = result["environment"]
    lines = [
        "# GPU check",
        "",
        f"{env.get('gpu', env['device'])}, torch {env['torch']}"
        + (f", CUDA {env['cuda']}" if env.get("cuda") else "")
        + f", iwae {env['iwae']}; {result['seconds']:.0f} s in all.",
        "",
        "## Training steps",
        "",
        steps_table(result["steps"]),
    ]
    hours = result["column_hours"]
    if hours:
        lines += [
            f"Stacked step of the whole one-layer column at minibatch 20 ({hours['column_models']} models): "
            f"{hours['column_stacked_step_ms']:.3f} ms. Burda's exact schedule (3,280 passes at minibatch 20): "
            f"{hours['burda_schedule_hours_column_stacked']:.2f} h for the stacked column, "
            f"{hours['burda_schedule_hours_column_single']:.2f} h for its models one at a time.",
            "",
        ]
    ev, agreement = result["evaluation"], result["agreement"]
    lines += [
        "## Evaluation",
        "",
        f"L_{ev['eval_k']}: {ev['seconds_per_10000_images']:.1f} s per 10,000 test images (timed on "
        f"{ev['timed_images']:,}).",
    ]
    if agreement:
        lines.append(
            f"The trained {agreement['model']} on the same {agreement['images']} binarised test images: NLL "
            f"{agreement['nll_device']:.4f} on the device, {agreement['nll_cpu']:.4f} on the CPU, difference "
            f"{agreement['nll_difference']:.4f} nats ({'within' if agreement['agree'] else 'NOT within'} "
            f"{AGREEMENT_NATS})."
        )
    lines += [
        "",
        "## The one-layer MNIST column, stacked, beside the paper",
        "",
        f"Settings: `{json.dumps(result['column']['settings'])}`; wall time {result['column']['wall_seconds']:.0f} s "
        "(one stacked process per k, all at once).",
        "",
        "| objective | k | passes | train s | test NLL | examples | paper |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["column"]["runs"]:
        lines.append(
            f"| {r['objective']} | {r['k']} | {r['passes']} of {r['passes_scheduled']} "
            f"| {_number(r['train_seconds'], 0)} | {_number(r['nll'])} | {r['eval_examples'] or '—'} "
            f"| {_number(r['paper_nll'])} |"
        )
    if result["column"]["failures"]:
        lines += ["", "Failures: " + "; ".join(f"k = {k}: {why}" for k, why in result["column"]["failures"].items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":  # a stacked training process of the column (see _train_column)
    train_worker(sys.argv[1])
