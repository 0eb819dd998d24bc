"""``iwae bench``: training-step and L_5000 evaluation speed beside Pyro, plain PyTorch and the matmul roofline.

See :mod:`iwae.lab.bench` for what is measured (shapes: minibatches ``[batch, x_dim]``, log-weights
``[k, batch]``). The Markdown table goes to stderr (and ``OUT/bench.md``), the JSON object to stdout
(and ``OUT/bench.json``); ``--json`` leaves the table out of stderr.
"""

from __future__ import annotations

import argparse
import sys

from iwae.cli.common import add_run_options, positive_int

# Deferred on purpose: the benchmark (iwae.lab.bench, iwae.fast, iwae.data) imports torch, which takes seconds
# that ``iwae --help`` and usage errors should not pay; the handler imports it.


def register(subparsers) -> None:
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
    add_run_options(p, json_flag=True)
    p.set_defaults(handler=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> dict:
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
