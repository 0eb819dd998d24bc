"""``iwae bench``: training-step and L_5000 evaluation speed beside Pyro, plain PyTorch and the matmul roofline.

See :mod:`iwae.lab.bench` for what is measured (shapes: minibatches ``[batch, x_dim]``, log-weights
``[k, batch]``). The Markdown table goes to stderr (and ``OUT/bench.md``), the JSON object to stdout
(and ``OUT/bench.json``); ``--json`` leaves the table out of stderr. ``iwae bench --stacked N`` times stacked
steps instead (:mod:`iwae.lab.bench.stacked`), ``iwae bench --memory`` measures the peak memory of training steps
against k (:mod:`iwae.lab.bench.training_memory`); ``iwae gpu-check`` runs the GPU check (:mod:`iwae.lab.gpu_check`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from iwae.cli.common import UsageError, add_run_options, positive_int, positive_int_list, writable_location
from iwae.names import BATCH_SCHEDULES, LR_SCALES

# Deferred on purpose: the benchmark (iwae.lab.bench, iwae.fast, iwae.data) imports torch, which takes seconds
# that ``iwae --help`` and usage errors should not pay; the handler imports it.


def distinct_list(text: str) -> list[int]:
    """argparse type: comma-separated whole numbers >= 1 without repeats, in the order given."""
    values = positive_int_list(text)
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected numbers without repeats, got {text!r}")
    return values


def layer_list(text: str) -> list[int]:
    """argparse type: stochastic layer counts of Burda's architectures, 1 and/or 2."""
    values = distinct_list(text)
    if not set(values) <= {1, 2}:
        raise argparse.ArgumentTypeError(f"expected 1, 2 or 1,2 (Burda's architectures), got {text!r}")
    return values


def register(subparsers) -> None:
    """Add ``bench`` and ``gpu-check`` to the ``iwae`` subparsers."""
    p = subparsers.add_parser(
        "bench",
        help="benchmark training steps and L_5000 evaluation against Pyro, plain PyTorch and the matmul roofline",
        description="Time IWAE training steps (ms/step, examples/s, GFLOP/s) of this library, a plain PyTorch "
        "implementation and Pyro's RenyiELBO(alpha=0) side by side, the matmul roofline of the same shapes, and "
        "L_5000 evaluation (seconds per 1,000 test images, peak memory). The full grid (layers 1 and 2, "
        "k in {1, 5, 50}, batch in {20, 100, 1000}, L_5000 on 1,000 images) takes tens of minutes on 2 cores; "
        "--quick takes under a minute (a few more with --compile). --memory instead measures the peak memory of "
        "training steps against k, one fresh process per measurement (the default grid: about 4 minutes on one "
        "thread).",
    )
    p.add_argument("--quick", action="store_true", help="one layer, k in {5, 50}, batch in {20, 100}, 20 eval images")
    p.add_argument("--threads", type=positive_int, help="torch.set_num_threads(N) for everything (default: torch's)")
    p.add_argument("--repeats", type=positive_int, help="timed repeats per measurement (default 11, quick 7)")
    p.add_argument("--out", help="directory for bench.json and bench.md")
    p.add_argument("--no-pyro", action="store_true", help="leave out the Pyro baseline")
    p.add_argument("--compile", action="store_true", help="time iwae's steps as 'iwae train --compile' takes them")
    p.add_argument(
        "--stacked",
        type=positive_int,
        metavar="N",
        help="instead: N models' stacked step against N single steps (iwae train --seeds), k in {1, 5, 50} (quick: "
        "{1, 5}) at --batch-sizes",
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="instead: peak memory of a few training steps at each --ks, one fresh process each, the default step "
        "beside IWAE_FAST=-allocator and IWAE_FAST=0, with iwae train's estimate (OUT/bench-memory.json, .md)",
    )
    p.add_argument("--ks", type=distinct_list, metavar="K,K,...",
                   help="samples per example for --memory (default 1,5,50,500,5000)")  # fmt: skip
    p.add_argument("--layers", type=layer_list, metavar="L,L",
                   help="stochastic layers for --memory: 1, 2 or 1,2 (default 1,2)")  # fmt: skip
    p.add_argument("--batch-sizes", type=distinct_list, metavar="B,B,...",
                   help="minibatch sizes for --stacked and --memory (default 20)")  # fmt: skip
    add_run_options(p, json_flag=True)
    p.set_defaults(handler=cmd_bench)

    p = subparsers.add_parser(
        "gpu-check",
        help="what a GPU does for this library, in one call of about 9 minutes (JSON and Markdown)",
        description="Time training steps (single and stacked) and L_5000 on the device, check its NLL against the "
        "CPU's, and train the one-layer MNIST Table 1 column stacked on the full schedule within the time budget, "
        "each model evaluated beside the paper's numbers. --smoke: toy sizes on the CPU.",
    )
    p.add_argument("--out", required=True, help="directory for gpu-check.json, gpu-check.md and the column's runs")
    p.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (seconds), as the test suite runs it")
    p.add_argument("--budget", type=positive_int, metavar="SECONDS", help="the whole check's time (default 520)")
    p.add_argument("--batch-schedule", choices=BATCH_SCHEDULES, help="the column's (default grow)")
    p.add_argument("--batch-size", type=positive_int, help="the column's minibatch (default 20; grow starts there)")
    p.add_argument("--lr-scale", choices=LR_SCALES, help="the column's rate scaling for --batch-size")
    p.add_argument(
        "--no-compile",
        action="store_true",
        help="stacked steps eagerly (default: as iwae train --compile takes them, captured as CUDA graphs on CUDA, "
        "through torch.compile on other devices)",
    )
    add_run_options(p)
    p.set_defaults(handler=cmd_gpu_check)


def cmd_gpu_check(args: argparse.Namespace) -> dict:
    """``iwae gpu-check``: :func:`iwae.lab.gpu_check.run_check`; its summary goes to stderr."""
    from dataclasses import replace

    from iwae.lab.gpu_check import CheckSettings, markdown, run_check, smoke_settings

    settings = (
        smoke_settings() if args.smoke else CheckSettings(device=args.device if args.device != "auto" else "cuda")
    )
    train = dict(settings.train)
    for name in ("batch_schedule", "batch_size", "lr_scale"):
        if getattr(args, name) is not None:
            train[name] = getattr(args, name)
    changes = {"train": train}
    if args.budget is not None:
        changes["budget_seconds"] = float(args.budget)
    if args.no_compile:
        changes["compile"] = False
    result = run_check(replace(settings, **changes), args.out, args.data_dir)
    print(markdown(result), file=sys.stderr)
    summary = {"out": args.out, "json": str(Path(args.out) / "gpu-check.json"), "seconds": round(result["seconds"], 1)}
    if result.get("errors"):  # the phases that ran are in the JSON; say which failed, and exit 1
        print(json.dumps(summary))
        phases = ", ".join(error["phase"] for error in result["errors"])
        print(f"gpu-check {args.out}: phases failed ({phases}); see {summary['json']}", file=sys.stderr)
        raise SystemExit(1)
    return summary


def cmd_stacked(args: argparse.Namespace) -> dict:
    """``iwae bench --stacked N``: :func:`iwae.lab.bench.stacked.measure` at each k and ``--batch-sizes``."""
    import torch

    from iwae.data import load_dataset
    from iwae.fast import allocator
    from iwae.lab.bench import stacked, write_outputs
    from iwae.lab.bench.settings import BURDA_BATCH
    from iwae.runs import resolve_device

    allocator.configure()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    images = load_dataset("mnist", args.data_dir, progress=not args.no_progress).train.images[:1000].to(device)
    rows = [
        stacked.measure(
            images,
            models=args.stacked,
            k=k,
            batch=batch,
            compile_model=args.compile,
            repeats=args.repeats or (5 if args.quick else 7),
        )
        for batch in args.batch_sizes or [BURDA_BATCH]
        for k in ((1, 5) if args.quick else (1, 5, 50))
    ]
    table = stacked.markdown(rows)
    result = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
    if args.out:
        write_outputs(result, args.out, "bench-stacked", lambda _: table)
    if not args.json:
        print(table, file=sys.stderr)
    return result


MODE_FLAGS = {  # the flags check_modes looks at, and their dests
    "--quick": "quick",
    "--repeats": "repeats",
    "--no-pyro": "no_pyro",
    "--compile": "compile",
    "--stacked": "stacked",
    "--ks": "ks",
    "--layers": "layers",
    "--batch-sizes": "batch_sizes",
}


def check_modes(args: argparse.Namespace) -> None:
    """Raise :class:`UsageError` (one line) for flags the chosen mode cannot take (before torch is imported)."""
    given = {flag: getattr(args, dest) not in (None, False) for flag, dest in MODE_FLAGS.items()}
    if args.memory:
        refused = [flag for flag in ("--quick", "--repeats", "--no-pyro", "--compile", "--stacked") if given[flag]]
        if refused:
            raise UsageError(f"iwae bench: --memory cannot take {', '.join(refused)} (see 'iwae bench --help')")
        if args.out:
            writable_location(args.out, "--out", "iwae bench")  # before minutes of measuring
        return
    for flag in ("--ks", "--layers"):
        if given[flag]:
            raise UsageError(f"iwae bench: {flag} only goes with --memory (see 'iwae bench --help')")
    if given["--batch-sizes"] and args.stacked is None:
        raise UsageError("iwae bench: --batch-sizes only goes with --stacked or --memory (see 'iwae bench --help')")


def cmd_memory(args: argparse.Namespace) -> dict:
    """``iwae bench --memory``: :func:`iwae.lab.bench.training_memory.measure_memory` over the flags' grid."""
    from iwae.data import load_dataset
    from iwae.lab.bench import training_memory
    from iwae.runs import resolve_device

    changes = {"device": args.device, "threads": args.threads, "progress": not args.no_progress}
    for name in ("ks", "layers"):
        if getattr(args, name) is not None:
            changes[name] = tuple(getattr(args, name))
    if args.batch_sizes is not None:
        changes["batches"] = tuple(args.batch_sizes)
    settings = training_memory.MemorySettings(**changes)
    resolve_device(args.device)  # a bad --device fails here, before the data are loaded
    images = load_dataset("mnist", args.data_dir, progress=settings.progress).train.images
    result = training_memory.measure_memory(settings, images)
    if args.out:
        training_memory.write_outputs(result, args.out)
    if not args.json:
        print(training_memory.markdown(result), file=sys.stderr)
    return result


def cmd_bench(args: argparse.Namespace) -> dict:
    """``iwae bench``: :func:`iwae.lab.bench.run.run_bench` (:func:`cmd_stacked` with ``--stacked``,
    :func:`cmd_memory` with ``--memory``)."""
    check_modes(args)
    if args.memory:
        return cmd_memory(args)
    if args.stacked is not None:
        return cmd_stacked(args)
    from iwae.data import load_dataset
    from iwae.fast import allocator
    from iwae.lab.bench import full_settings, markdown, quick_settings, run_bench, write_outputs
    from iwae.runs import resolve_device

    # Every implementation the bench compares trains with glibc's malloc thresholds fixed, as 'iwae train' does.
    allocator.configure()

    changes = {"threads": args.threads, "device": args.device, "pyro": not args.no_pyro, "compile": args.compile}
    changes["progress"] = not args.no_progress
    if args.repeats is not None:
        changes["repeats"] = args.repeats
    settings = (quick_settings if args.quick else full_settings)(**changes)
    resolve_device(args.device)  # a bad --device fails here, before the data are loaded
    dataset = load_dataset("mnist", args.data_dir, progress=settings.progress)
    result = run_bench(settings, dataset)
    if args.out:
        write_outputs(result, args.out)
    if not args.json:
        print(markdown(result), file=sys.stderr)
    return result
