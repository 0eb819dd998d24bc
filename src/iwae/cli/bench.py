"""``iwae bench``: training-step and L_5000 evaluation speed beside Pyro, plain PyTorch and the matmul roofline.

See :mod:`iwae.lab.bench` for what is measured (shapes: minibatches ``[batch, x_dim]``, log-weights
``[k, batch]``). The Markdown table goes to stderr (and ``OUT/bench.md``), the JSON object to stdout
(and ``OUT/bench.json``); ``--json`` leaves the table out of stderr. ``iwae bench --stacked N`` times stacked
steps instead (:mod:`iwae.lab.bench.stacked`); ``iwae gpu-check`` runs the GPU check (:mod:`iwae.lab.gpu_check`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from iwae.cli.common import add_run_options, positive_int, positive_int_list
from iwae.names import BATCH_SCHEDULES, LR_SCALES

# Deferred on purpose: the benchmark (iwae.lab.bench, iwae.fast, iwae.data) imports torch, which takes seconds
# that ``iwae --help`` and usage errors should not pay; the handler imports it.


def register(subparsers) -> None:
    """Add ``bench`` and ``gpu-check`` to the ``iwae`` subparsers."""
    p = subparsers.add_parser(
        "bench",
        help="benchmark training steps and L_5000 evaluation against Pyro, plain PyTorch and the matmul roofline",
        description="Time IWAE training steps (ms/step, examples/s, GFLOP/s) of this library, a plain PyTorch "
        "implementation and Pyro's RenyiELBO(alpha=0) side by side, the matmul roofline of the same shapes, and "
        "L_5000 evaluation (seconds per 1,000 test images, peak memory). The full grid (layers 1 and 2, "
        "k in {1, 5, 50}, batch in {20, 100, 1000}, L_5000 on 1,000 images) takes tens of minutes on 2 cores; "
        "--quick takes under a minute (a few more with --compile).",
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
    p.add_argument("--batch-sizes", type=positive_int_list, default=[20], metavar="B,B,...",
                   help="minibatch sizes for --stacked (default 20)")  # fmt: skip
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

    from iwae.checkpoint import atomic_write_text
    from iwae.data import load_dataset
    from iwae.fast import allocator
    from iwae.lab.bench import stacked
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
        for batch in args.batch_sizes
        for k in ((1, 5) if args.quick else (1, 5, 50))
    ]
    table = stacked.markdown(rows)
    result = {"device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows}
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "bench-stacked.json", json.dumps(result, indent=2) + "\n")
        atomic_write_text(out / "bench-stacked.md", table)
    if not args.json:
        print(table, file=sys.stderr)
    return result


def cmd_bench(args: argparse.Namespace) -> dict:
    """``iwae bench``: :func:`iwae.lab.bench.run.run_bench` (or :func:`cmd_stacked` with ``--stacked``)."""
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
