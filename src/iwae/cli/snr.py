"""``iwae snr [RUN]``: the gradient signal-to-noise study of Rainforth et al. (2018) (:mod:`iwae.studies.snr`).

Gradients are taken at fixed parameters on one fixed minibatch ``x`` ``[batch, x_dim]`` (the first
``--batch-size`` training examples, binarised once with ``--seed``); each estimate draws k samples per
example (log-weights ``[k, batch]``). Without RUN a fresh, seeded one-layer MNIST model is used.

``--model rainforth`` studies Rainforth et al.'s Gaussian model instead (:mod:`iwae.studies.rainforth`; no RUN).
There ``x`` is the first ``--batch-size`` points of its seeded data set, the repeats grow per (estimator, K), and
each slope is fitted over the Ks clear of their floor (:func:`iwae.studies.snr.run_adaptive_study`).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from iwae.cli.common import UsageError, add_run_options, positive_float, positive_int_list, writable_location

# Deferred on purpose: the study, the model and the data (iwae.studies.snr, iwae.train, iwae.data...) import
# torch, which takes seconds that ``iwae --help`` and usage errors should not pay; the handler imports them.

DEFAULT_REPEATS = 100
DEFAULT_BATCH = 1
MODELS = ("mnist", "rainforth")
RAINFORTH_REPEATS = 1000  # the first round; the repeats then grow per (estimator, K)
# iwae.studies.rainforth.N_DATA, here without torch (tests/studies/test_rainforth.py checks they agree)
RAINFORTH_DATA = 1024
RAINFORTH_ONLY = ("max_samples", "rel_error", "floor_factor")  # flags that only --model rainforth takes


def _sorted_ks(text: str) -> list[int]:
    return sorted(set(positive_int_list(text)))


def _name_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _sample_count(text: str) -> int:
    """argparse type: a whole number >= 1, also written like 1e8."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number such as 100000000 or 1e8, got {text!r}") from None
    if not (value >= 1 and value == int(value)):
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return int(value)


def register(subparsers) -> None:
    """Add ``snr`` to the ``iwae`` subparsers."""
    p = subparsers.add_parser(
        "snr",
        help="gradient signal-to-noise ratio against K for the standard, STL and DReG estimators",
        description="Per-parameter gradient SNR = |mean| / std over repeated estimates at fixed parameters "
        "(Rainforth et al. 2018), for the encoder and the decoder of an IWAE_K objective.",
    )
    p.add_argument("run", nargs="?", help="run directory (default: a fresh one-layer MNIST model)")
    p.add_argument(
        "--model",
        choices=MODELS,
        default="mnist",
        help="mnist: RUN's model, or a fresh one-layer MNIST model; rainforth: Rainforth et al.'s "
        "Gaussian model (D = 20, no RUN), repeats grown per K, slopes fitted clear of the floor",
    )
    p.add_argument("--estimators", type=_name_list, help="comma-separated (default: every estimator)")
    p.add_argument("--ks", type=_sorted_ks, help="comma-separated values of K (default 1,3,10,30,100,300,1000)")
    p.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"gradient estimates per K (>= 2; default {DEFAULT_REPEATS}; rainforth: the first round, "
        f"default {RAINFORTH_REPEATS})",
    )
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH, help="examples in the fixed minibatch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-samples",
        type=_sample_count,
        default=None,
        help="rainforth: repeats x K x batch per estimator and K at most (default 1e8)",
    )
    p.add_argument(
        "--rel-error",
        type=positive_float,
        default=None,
        help="rainforth: repeats grow until the median SNR s has 1/(s sqrt(repeats)) <= this (default 0.1)",
    )
    p.add_argument(
        "--floor-factor",
        type=positive_float,
        default=None,
        help="rainforth: a K enters a slope if its median SNR > this x the floor of its repeats (default 3)",
    )
    p.add_argument("--out", help="directory for snr.json and snr.png (default RUN/snr or ./snr-out)")
    add_run_options(p, json_flag=True)
    p.set_defaults(handler=cmd_snr)


def _check_sample_memory(ks: list[int], batch: int, bytes_per_sample: int, device) -> None:
    """Refuse Ks of which one repeat alone (K x batch samples, at least ``bytes_per_sample`` each) cannot fit in
    ``device``'s memory, before anything is allocated or written."""
    from iwae.memory import device_memory, format_bytes

    need, have = max(ks) * batch * bytes_per_sample, device_memory(device)
    if have is not None and need > have:
        raise UsageError(
            f"iwae snr: K = {max(ks)} needs at least {format_bytes(need)} for one repeat of a batch of {batch} "
            f"(the {device.type} has {format_bytes(have)}); choose smaller --ks"
        )


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


def _check_rainforth_args(args: argparse.Namespace) -> None:
    """Usage errors of ``--model`` and its flags, before torch is imported and anything is written."""
    if args.model != "rainforth":
        given = [f"--{name.replace('_', '-')}" for name in RAINFORTH_ONLY if getattr(args, name) is not None]
        if given:
            raise UsageError(f"iwae snr: {', '.join(given)} only with --model rainforth")
        return
    if args.run is not None:
        raise UsageError("iwae snr: --model rainforth builds its own model; drop the run directory or the --model")
    if args.repeats is not None and args.repeats < 2:
        raise UsageError(f"iwae snr: --repeats must be >= 2 for a standard deviation, got {args.repeats}")
    from iwae.names import ESTIMATOR_NAMES  # no torch

    for name in [""] if args.estimators == [] else args.estimators or ():
        if name not in ESTIMATOR_NAMES:
            raise UsageError(f"iwae snr: unknown estimator {name!r}; choose from {', '.join(ESTIMATOR_NAMES)}")
    if not 1 <= args.batch_size <= RAINFORTH_DATA:
        raise UsageError(f"iwae snr: --batch-size must be between 1 and {RAINFORTH_DATA}, got {args.batch_size}")
    writable_location(args.out or "snr-out", "--out", "iwae snr")


def _adaptive_table(summary: dict) -> str:
    lines = [f"median SNR (batch {summary['batch_size']}; repeats per K grown to a relative error of "
             f"{summary['rel_error']} or {summary['max_samples']:.0e} samples)"]  # fmt: skip
    header = "".join(f"{'K=' + str(k):>10}" for k in summary["ks"])
    lines.append(f"{'estimator':<10}{'part':<9}{header}")
    for est, parts in summary["median_snr"].items():
        for part, values in parts.items():
            lines.append(f"{est:<10}{part:<9}" + "".join(f"{v:>10.4f}" for v in values))
        lines.append(f"{est:<10}{'repeats':<9}" + "".join(f"{r:>10}" for r in summary["repeats_per_k"][est]))
    lines.append(f"slopes over the Ks whose median SNR > {summary['floor_factor']} x its floor; "
                 "95% intervals: OLS t, bootstrap over repeats")  # fmt: skip
    for part, fits in summary["slope_fits"].items():
        for est, fit in fits.items():
            if fit["slope"] is None:
                lines.append(f"{est:<10}{part:<9}  no slope ({fit['reason']})")
                continue
            ols = f"[{fit['ci95_low']:+.3f}, {fit['ci95_high']:+.3f}]" if "ci95_low" in fit else "[n/a]"
            boot = (f"[{fit['bootstrap_ci95_low']:+.3f}, {fit['bootstrap_ci95_high']:+.3f}]"
                    if "bootstrap_ci95_low" in fit else "[n/a]")  # fmt: skip
            ks = ",".join(map(str, fit["fit_ks"]))
            lines.append(f"{est:<10}{part:<9}  {fit['slope']:+.3f}  t {ols}  bootstrap {boot}  K = {ks}")
    cells = "".join(f"{v:>10.2f}" for v in summary["median_ess"])
    lines.append(f"{'ESS':<19}{cells}")
    lines.append(f"plot: {summary['png']}")
    return "\n".join(lines)


def _cmd_rainforth(args: argparse.Namespace) -> dict:
    import torch

    from iwae.estimators import ESTIMATOR_NAMES
    from iwae.runs import resolve_device
    from iwae.studies import rainforth
    from iwae.studies.snr import (
        DEFAULT_FLOOR_FACTOR,
        DEFAULT_KS,
        DEFAULT_MAX_SAMPLES,
        DEFAULT_REL_ERROR,
        run_adaptive_study,
        write_study,
    )

    device = resolve_device(args.device)
    if device.type == "mps":
        raise UsageError("iwae snr: --model rainforth computes in float64, which mps lacks; use --device cpu or cuda")
    ks = args.ks if args.ks is not None else list(DEFAULT_KS)
    estimators = args.estimators if args.estimators is not None else list(ESTIMATOR_NAMES)
    repeats = args.repeats if args.repeats is not None else RAINFORTH_REPEATS
    settings = {
        "rel_error": args.rel_error if args.rel_error is not None else DEFAULT_REL_ERROR,
        "max_samples": args.max_samples if args.max_samples is not None else DEFAULT_MAX_SAMPLES,
        "floor_factor": args.floor_factor if args.floor_factor is not None else DEFAULT_FLOOR_FACTOR,
    }
    _check_sample_memory(ks, args.batch_size, 2 * rainforth.DIM * 8, device)  # z and its noise, float64
    problem = rainforth.make_problem(args.seed)
    model = problem.model.to(device)
    x = problem.data[: args.batch_size].to(device)
    started = time.perf_counter()
    study = run_adaptive_study(
        model, x, ks, estimators, repeats, seed=args.seed, progress=not args.no_progress, **settings
    )
    seconds = round(time.perf_counter() - started, 2)
    checks = rainforth.gradient_checks(
        model, x, ks, study.mean_gradients, study.stderr_gradients, study.n_encoder,
        torch.Generator(device=device).manual_seed(args.seed * 1_000_003 + 3),
    )  # fmt: skip
    meta = {
        "run": None,
        "model": "rainforth",
        "dataset": f"rainforth-gaussian (D = {rainforth.DIM}, N = {rainforth.N_DATA}, seed {args.seed})",
        "data_points": f"the first {args.batch_size} of the data set",
        "perturbation": rainforth.PERTURBATION,
        "q_variance": rainforth.Q_VARIANCE,
        "objective": "iwae",
        "seed": args.seed,
        "seconds": seconds,
        "checks": checks,
    }
    summary = write_study(study, Path(args.out) if args.out else Path("snr-out"), meta)
    if not args.json:
        print(_adaptive_table(summary), file=sys.stderr)
    return summary


def cmd_snr(args: argparse.Namespace) -> dict:
    """``iwae snr``: run the study (the Rainforth model's adaptive one with ``--model rainforth``), write its files."""
    _check_rainforth_args(args)
    if args.model == "rainforth":
        return _cmd_rainforth(args)
    if args.repeats is None:
        args.repeats = DEFAULT_REPEATS
    from iwae.estimators import ESTIMATOR_NAMES
    from iwae.runs import resolve_device
    from iwae.studies.snr import DEFAULT_KS, run_study, write_study

    ks = args.ks if args.ks is not None else list(DEFAULT_KS)
    estimators = args.estimators if args.estimators is not None else list(ESTIMATOR_NAMES)
    device = resolve_device(args.device)
    model, x, config = _model_and_batch(args, device)
    _check_sample_memory(ks, x.shape[0], 4 * x.shape[1], device)  # the decoder's output alone, float32
    if args.run and not args.out:
        from iwae.files import check_derived

        check_derived(Path(args.run) / "snr", "the study's folder")
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
