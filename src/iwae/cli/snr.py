"""``iwae snr [RUN]``: the gradient signal-to-noise study of Rainforth et al. (2018), see :mod:`iwae.studies.snr`.

Gradients are taken at fixed parameters on one fixed minibatch ``x`` ``[batch, x_dim]`` (the first
``--batch-size`` training examples, binarised once with ``--seed``); each estimate draws k samples per
example (log-weights ``[k, batch]``). Without RUN a fresh, seeded one-layer MNIST model is used.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from iwae.cli.common import add_run_options, positive_int_list

# Deferred on purpose: the study, the model and the data (iwae.studies.snr, iwae.train, iwae.data...) import
# torch, which takes seconds that ``iwae --help`` and usage errors should not pay; the handler imports them.

DEFAULT_REPEATS = 100
DEFAULT_BATCH = 1


def _sorted_ks(text: str) -> list[int]:
    return sorted(set(positive_int_list(text)))


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "snr",
        help="gradient signal-to-noise ratio against K for the standard, STL and DReG estimators",
        description="Per-parameter gradient SNR = |mean| / std over repeated estimates at fixed parameters "
        "(Rainforth et al. 2018), for the encoder and the decoder of an IWAE_K objective.",
    )
    p.add_argument("run", nargs="?", help="run directory (default: a fresh one-layer MNIST model)")
    p.add_argument("--estimators", type=_name_list, help="comma-separated (default: every estimator)")
    p.add_argument("--ks", type=_sorted_ks, help="comma-separated values of K (default 1,3,10,30,100,300,1000)")
    p.add_argument("--repeats", type=int, default=DEFAULT_REPEATS, help="gradient estimates per K (>= 2)")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="examples in the fixed minibatch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="directory for snr.json and snr.png (default RUN/snr or ./snr-out)")
    add_run_options(p, json_flag=True)
    p.set_defaults(handler=cmd_snr)


def _model_and_batch(args: argparse.Namespace, device):
    import torch

    from iwae.config import TrainConfig
    from iwae.data import binarize, load_dataset
    from iwae.runs import load_model
    from iwae.train import build_model

    if args.run is not None:
        model, config = load_model(Path(args.run), device)
    else:
        config = TrainConfig(dataset="mnist", seed=args.seed)
        model = None
    data = load_dataset(config.dataset, args.data_dir, progress=not args.no_progress)
    train = data.train.subset(config.train_limit)
    if model is None:
        model = build_model(config, train.images, device)
    if not 1 <= args.batch_size <= len(train):
        raise ValueError(f"--batch-size must be between 1 and {len(train)}, got {args.batch_size}")
    generator = torch.Generator().manual_seed(args.seed)
    x = binarize(train.images[: args.batch_size], data.binarization, generator).to(device)
    return model, x, config


def _table(summary: dict) -> str:
    lines = [f"median SNR ({summary['repeats']} repeats, batch {summary['batch_size']})"]
    header = "".join(f"{'K=' + str(k):>10}" for k in summary["ks"])
    lines.append(f"{'estimator':<10}{'part':<9}{header}     slope")
    for est, parts in summary["median_snr"].items():
        for part, values in parts.items():
            fit = summary["slope_fits"][part][est]
            ci = f" [{fit['ci95_low']:+.2f}, {fit['ci95_high']:+.2f}]" if "ci95_low" in fit else ""
            cells = "".join(f"{v:>10.4f}" for v in values)
            lines.append(f"{est:<10}{part:<9}{cells}  {fit['slope']:+.3f}{ci}")
    if summary.get("median_ess"):
        cells = "".join(f"{v:>10.2f}" for v in summary["median_ess"])
        slope = f"  {summary['ess_slope']:+.3f}" if summary["ess_slope"] is not None else ""
        lines.append(f"{'ESS':<19}{cells}{slope}")
        lines.append("(median effective sample size of the weights; slopes of +-1/2 need ESS to grow like K)")
    lines.append(f"plot: {summary['png']}")
    return "\n".join(lines)


def cmd_snr(args: argparse.Namespace) -> dict:
    from iwae.estimators import ESTIMATOR_NAMES
    from iwae.runs import resolve_device
    from iwae.studies.snr import DEFAULT_KS, run_study, write_study

    ks = args.ks if args.ks is not None else list(DEFAULT_KS)
    estimators = args.estimators if args.estimators is not None else list(ESTIMATOR_NAMES)
    device = resolve_device(args.device)
    model, x, config = _model_and_batch(args, device)
    started = time.perf_counter()
    study = run_study(model, x, ks, estimators, args.repeats, args.seed, progress=not args.no_progress)
    out = Path(args.out) if args.out else (Path(args.run) / "snr" if args.run else Path("snr-out"))
    meta = {
        "run": args.run,
        "dataset": config.dataset,
        "objective": "iwae",
        "seed": args.seed,
        "seconds": round(time.perf_counter() - started, 2),
    }
    summary = write_study(study, out, meta)
    if not args.json:
        print(_table(summary), file=sys.stderr)
    return summary
