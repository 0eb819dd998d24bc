"""``iwae posterior``, ``iwae camel``, ``iwae anomaly`` and ``iwae impute``: the analyses beyond the table.

Each handler returns the JSON object the CLI prints; tables and progress go to stderr.
"""

from __future__ import annotations

import argparse
import sys

from iwae.cli.common import add_deprecated_alias, add_run_options, positive_int, positive_int_list

# Deferred on purpose: the studies (iwae.studies.*) import torch, which takes seconds that ``iwae --help`` and
# usage errors should not pay; each handler imports its study.


def _common(p: argparse.ArgumentParser, data: bool = True) -> None:
    """``--seed`` and the run options every analysis takes (``--data-dir`` only with ``data``)."""
    p.add_argument("--seed", type=int, default=0)
    add_run_options(p, json_flag=True, data=data)


def cmd_posterior(args: argparse.Namespace) -> dict:
    """``iwae posterior``: :func:`iwae.studies.posterior.posterior_run`."""
    from iwae.studies.posterior import posterior_run

    result = posterior_run(
        args.run, ks=args.ks, digits=args.digits, n_draws=args.draws, grid_size=args.grid, out_dir=args.out,
        seed=args.seed, device=args.device, data_dir=args.data_dir, progress=not args.no_progress,
    )  # fmt: skip
    if not args.json:
        print("k | mean TV(true posterior, q_IW density) | mean TV(true, SIR histogram)", file=sys.stderr)
        for k in args.ks:
            tv_d, tv_h = result["mean_tv_density"][str(k)], result["mean_tv_hist"][str(k)]
            print(f"{k} | {tv_d:.4f} | {tv_h:.4f}", file=sys.stderr)
        print(f"histogram noise floor {result['mean_tv_hist_floor']:.4f}", file=sys.stderr)
    return result


def cmd_camel(args: argparse.Namespace) -> dict:
    """``iwae camel``: :func:`iwae.studies.camel.run_camel`."""
    from iwae.studies.camel import CamelSettings, run_camel

    settings = CamelSettings(k=args.k, vae_k=args.vae_k, epochs=args.epochs, n_train=args.n_train,
                             n_test=args.n_test, eval_k=args.eval_k, seed=args.seed)  # fmt: skip
    result = run_camel(settings, args.out, progress=not args.no_progress)
    if not args.json:
        print(f"true E[log p(x)] {result['true']:.4f} | VAE L_{args.eval_k} {result['vae']:.4f} | "
              f"IWAE (k={args.k}) L_{args.eval_k} {result['iwae']:.4f}", file=sys.stderr)  # fmt: skip
    return result


def cmd_anomaly(args: argparse.Namespace) -> dict:
    """``iwae anomaly``: :func:`iwae.studies.anomaly.anomaly_run`, after checking the hold-out flags."""
    from iwae.studies.anomaly import anomaly_run

    if args.holdout_digit is not None and not 0 <= args.holdout_digit <= 9:
        raise ValueError(f"--holdout-digit must be 0..9, got {args.holdout_digit}")
    if args.holdout_run is not None and args.holdout_digit is None:
        raise ValueError("--holdout-run needs --holdout-digit (the digit that run was trained without)")
    result = anomaly_run(
        args.run, n_samples=args.k, limit=args.limit, holdout_digit=args.holdout_digit,
        holdout_run=args.holdout_run, holdout_epochs=args.holdout_epochs,
        holdout_train_limit=args.holdout_train_limit, out_dir=args.out, seed=args.seed, device=args.device,
        data_dir=args.data_dir, progress=not args.no_progress,
    )  # fmt: skip
    if not args.json:
        print(result["markdown"], file=sys.stderr)
    return result


def cmd_impute(args: argparse.Namespace) -> dict:
    """``iwae impute``: :func:`iwae.studies.impute.impute_run`; the epochs default per dataset."""
    from iwae.studies.impute import ImputeSettings, impute_run

    if not 0.0 < args.missing < 1.0:
        raise ValueError(f"--missing must be in (0, 1), got {args.missing}")
    epochs = args.epochs if args.epochs is not None else (100 if args.dataset == "breast-cancer" else 20)
    settings = ImputeSettings(missing=args.missing, k=args.k, epochs=epochs, n_impute=args.impute_k,
                              n_multiple=args.multiple, seed=args.seed)  # fmt: skip
    result = impute_run(args.dataset, settings, args.out, limit=args.limit, progress=not args.no_progress)
    if not args.json:
        print(result["markdown"], file=sys.stderr)
    return result


def register(subparsers) -> None:
    """Add ``posterior``, ``camel``, ``anomaly`` and ``impute`` to the ``iwae`` subparsers."""
    p = subparsers.add_parser("posterior", help="q_IW against the true posterior for a 2-D latent model")
    p.add_argument("run", help="run directory (one stochastic layer with a 2-D latent)")
    p.add_argument("--ks", type=positive_int_list, default=[1, 10, 100], help="proposal counts k (default 1,10,100)")
    p.add_argument("--digits", type=positive_int, default=4, help="how many test digits (default 4)")
    p.add_argument("--draws", type=positive_int, default=1000, help="SIR draws per digit and k (default 1000)")
    p.add_argument("--grid", type=positive_int, default=60, help="grid cells per axis (default 60)")
    p.add_argument("--out", help="output directory (default RUN/posterior)")
    _common(p)
    p.set_defaults(handler=cmd_posterior)

    p = subparsers.add_parser("camel", help="VAE vs IWAE on the 1-D two-hump density")
    p.add_argument("--out", default="camel", help="output directory (default ./camel)")
    p.add_argument("--epochs", type=positive_int, default=200, help="passes over the training sample (default 200)")
    p.add_argument("--k", type=positive_int, default=20, help="IWAE samples (default 20)")
    p.add_argument("--vae-k", type=positive_int, default=20, help="VAE samples, averaged outside the log (default 20)")
    p.add_argument("--n-train", type=positive_int, default=5000)
    p.add_argument("--n-test", type=positive_int, default=2000)
    p.add_argument("--eval-k", type=positive_int, default=5000, help="k of the L_k test score (default 5000)")
    _common(p, data=False)
    p.set_defaults(handler=cmd_camel)

    p = subparsers.add_parser("anomaly", help="six VAE/IWAE anomaly scores and their AUROC")
    p.add_argument("run", help="run directory of a model trained on MNIST")
    k = p.add_argument("--k", type=positive_int, default=100, help="samples per example (default 100)")
    add_deprecated_alias(p, "--L", k)
    p.add_argument("--limit", type=positive_int, default=1000, help="examples per class (default 1000)")
    p.add_argument("--holdout-digit", type=int, help="also score a model trained without this digit")
    p.add_argument("--holdout-run", help="a run trained without --holdout-digit (else one is trained)")
    p.add_argument("--holdout-epochs", type=positive_int, default=5, help="epochs of the held-out model (default 5)")
    p.add_argument("--holdout-train-limit", type=positive_int, help="train the held-out model on N examples")
    p.add_argument("--out", help="output directory (default RUN/anomaly)")
    _common(p)
    p.set_defaults(handler=cmd_anomaly)

    p = subparsers.add_parser("impute", help="MIWAE imputation of values missing completely at random")
    p.add_argument("--dataset", default="breast-cancer", choices=["mnist", "breast-cancer"])
    p.add_argument("--missing", type=float, default=0.5, help="fraction missing (default 0.5)")
    k = p.add_argument("--k", type=positive_int, default=20, help="samples per example to train (default 20)")
    impute_k = p.add_argument("--impute-k", type=positive_int, default=1000,
                              help="samples per example to impute (default 1000)")  # fmt: skip
    add_deprecated_alias(p, "--K", k)
    add_deprecated_alias(p, "--L", impute_k)
    p.add_argument("--multiple", type=positive_int, default=20, help="SIR imputations per example (default 20)")
    p.add_argument("--epochs", type=positive_int, help="training passes (default 100 tabular, 20 MNIST)")
    p.add_argument("--limit", type=positive_int, help="rows used (MNIST default 2000 images)")
    p.add_argument("--out", default="impute", help="output directory (default ./impute)")
    _common(p, data=False)
    p.set_defaults(handler=cmd_impute)
