"""``iwae train``, ``iwae eval`` and ``iwae sample``: train a run directory, evaluate it, draw from it.

Each handler returns the JSON object the CLI prints; progress goes to stderr.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from iwae.cli.common import (
    UsageError,
    add_run_options,
    fraction,
    non_negative_float,
    positive_float,
    positive_int,
    positive_int_list,
    schedule,
    seed,
    seed_list,
    writable_location,
)
from iwae.names import (
    AUTHORS_EVAL_BATCH,
    BINARIZATIONS,
    DATA_ORDERS,
    DATASET_NAMES,
    ESTIMATOR_NAMES,
    LOSS_REDUCTIONS,
    OBJECTIVE_NAMES,
    OPTIMIZERS,
    PROTOCOLS,
    TRAIN_SPLITS,
    UNIT_DEFINITIONS,
)

# Deferred on purpose: everything the handlers call (iwae.train, iwae.evaluate, iwae.sampling, iwae.fast) imports
# torch, which takes seconds that ``iwae --help`` and usage errors should not pay. The imports are inside the
# functions below; the choices come from iwae.names, which imports nothing.

# iwae eval's largest --k: L_k costs k samples per example, and at 10^6 the 10,000 MNIST test examples already take
# about 11 hours on this project's 2-core CPU (20 s per 1,000 examples at k = 5000); memory is bounded whatever k is
# (iwae.evaluate draws the samples in chunks).
MAX_EVAL_K = 1_000_000
DEFAULT_EVAL_BATCH = 100


def eval_k(text: str) -> int:
    """argparse type: iwae eval's --k, a whole number 1..:data:`MAX_EVAL_K`."""
    value = positive_int(text)
    if value > MAX_EVAL_K:
        raise argparse.ArgumentTypeError(
            f"expected at most {MAX_EVAL_K:,}, got {value:,}: L_k draws k samples per example, and at {MAX_EVAL_K:,} "
            "the 10,000 test examples already take hours (Burda's k is 5000)"
        )
    return value


def at_least_two(text: str) -> int:
    """argparse type: iwae eval's --limit, a whole number >= 2 (active units are a variance over the examples)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError("expected a number >= 2 (active units are a variance over examples), got 1")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train a VAE or IWAE", description="Train a VAE or IWAE (Burda et al.).")
    p.add_argument("--dataset", default="mnist", choices=DATASET_NAMES, metavar="DATASET",
                   help="%(choices)s (default %(default)s)")  # fmt: skip
    p.add_argument(
        "--objective",
        default="iwae",
        choices=OBJECTIVE_NAMES,
        metavar="OBJECTIVE",
        help="bound to train: %(choices)s (default %(default)s; miwae/piwae need --M, ciwae --beta, power --p, "
        "vr --alpha)",
    )
    p.add_argument("--estimator", default="standard", choices=ESTIMATOR_NAMES, metavar="ESTIMATOR",
                   help="gradient estimator: %(choices)s (default %(default)s)")  # fmt: skip
    p.add_argument("--M", type=positive_int, default=1, help="miwae/piwae: split the k samples into M groups")
    p.add_argument("--beta", type=float, help="ciwae: weight of the ELBO, 0..1")
    p.add_argument("--p", type=float, help="power: the power-mean exponent (<= 1; 1 is IWAE, 0 the ELBO)")
    p.add_argument("--alpha", type=float, help="vr: the VR-IWAE alpha (>= 0; 0 is IWAE, 1 the ELBO)")
    p.add_argument("--k", type=positive_int, help="samples per example (default 1, or the --k-schedule's last)")
    p.add_argument("--layers", type=positive_int,
                   help="stochastic layers: Burda's nets for 1 (default) and 2; more need --latent-dims")  # fmt: skip
    when = p.add_mutually_exclusive_group()
    when.add_argument("--epochs", type=positive_int, help="one stage of N passes at --lr")
    when.add_argument("--schedule", type=schedule,
                      help="'burda' (3,280 passes, default) or 'burda:S' (its first S stages)")  # fmt: skip
    p.add_argument("--lr", type=positive_float, help="learning rate with --epochs (default 1e-3)")
    p.add_argument("--batch-size", type=positive_int, default=20)
    p.add_argument(
        "--beta1",
        type=fraction,
        help="Adam beta1 (default 0.9, the paper's; 0.99 with --optimizer burda-adam, the authors' code)",
    )
    p.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        help="adam (default: torch.optim.Adam, as the paper describes) or burda-adam (the authors' code: "
        "second moments start at 1, the update lags one step; iwae.optim.BurdaAdam)",
    )
    p.add_argument(
        "--data-order",
        choices=DATA_ORDERS,
        help="shuffled (default: a fresh permutation every pass) or fixed (the authors' code: "
        "minibatch i of every pass is examples 20i..20i+19)",
    )
    p.add_argument(
        "--loss-reduction",
        choices=LOSS_REDUCTIONS,
        help="the minibatch's loss: mean (default) or sum over its examples (the authors' code)",
    )
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        help="authors: the authors' code as it ran (--optimizer burda-adam, --beta1 0.99, --data-order "
        "fixed, --loss-reduction sum); see docs/protocol.md",
    )
    p.add_argument(
        "--binarization",
        choices=BINARIZATIONS,
        help="grey-level data: dynamic (default: a fresh Bernoulli draw at every use) or threshold "
        "(pixel >= 0.5, fixed)",
    )
    p.add_argument(
        "--train-split",
        choices=TRAIN_SPLITS,
        help="train (default: Burda's 59,600 MNIST images) or train+valid (all 60,000)",
    )
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=seed, default=0)
    seeds.add_argument(
        "--seeds",
        type=seed_list,
        metavar="S,S,...",
        help="train these seeds as one stacked computation, each into OUT/seed-S (a complete run directory)",
    )
    p.add_argument("--batch-schedule", choices=["fixed", "grow"],
                   help="grow: keep the first stage's learning rate and grow the minibatch by the factor it would "
                   "have fallen (Smith et al. 2018); fixed (default): one minibatch size")  # fmt: skip
    p.add_argument("--lr-scale", choices=["none", "linear", "sqrt"],
                   help="scale the schedule's learning rates for a --batch-size other than Burda's 20")  # fmt: skip
    p.add_argument("--k-schedule", type=positive_int_list, metavar="K,K,...",
                   help="one k per stage of the schedule, ending at --k")  # fmt: skip
    p.add_argument("--train-limit", type=positive_int, help="train on the first N training examples only")
    p.add_argument("--activation", default="tanh", choices=["tanh", "relu", "softplus"])
    p.add_argument(
        "--latent-dims",
        type=positive_int_list,
        help="latent sizes, one per stochastic layer: '2', '100,50', '100,50,20' (any depth)",
    )
    p.add_argument(
        "--hidden-dims",
        type=positive_int_list,
        help="with --latent-dims: each stochastic layer's two hidden layers' size, e.g. '200,100,40' "
        "(default: Burda's for 1 and 2 layers, else twice each latent size)",
    )
    p.add_argument("--checkpoint-minutes", type=non_negative_float, default=2.0, help="checkpoint at least this often")
    p.add_argument("--max-epochs", type=positive_int, help="stop after N epochs of this call (resume later)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument(
        "--compile",
        action="store_true",
        help="on CUDA: each training step captured once as a CUDA graph and replayed; elsewhere: autograd through "
        "torch.compile (model, bound and surrogates as one graph) instead of the default explicit "
        "backpropagation, which was faster on a 2-core CPU",
    )
    p.add_argument(
        "--init-from",
        metavar="RUN",
        help="continue a finished run: its final weights and its optimiser's state (Burda's Table 2, "
        "as the authors' code ran it)",
    )
    p.add_argument(
        "--fresh-optimizer",
        action="store_true",
        help="with --init-from: start a new optimiser instead of continuing the run's",
    )
    p.add_argument("--out", required=True, help="run directory")
    add_run_options(p)
    p.set_defaults(handler=cmd_train)

    p = subparsers.add_parser("eval", help="test NLL (L_k), active units, KL and reconstruction terms")
    p.add_argument("run", help="run directory")
    p.add_argument("--k", type=eval_k, default=5000,
                   help=f"samples per example of L_k (default 5000, at most {MAX_EVAL_K:,})")  # fmt: skip
    p.add_argument("--split", default="test", choices=["test", "train", "valid"])
    p.add_argument("--limit", type=at_least_two, help="only the first N examples of the split (N >= 2)")
    p.add_argument("--seed", type=seed, default=0)
    p.add_argument("--batch-size", type=positive_int, help="examples per minibatch of L_k (default 100)")
    p.add_argument("--no-prune", action="store_true", help="skip the NLL with inactive units removed")
    p.add_argument(
        "--units",
        choices=UNIT_DEFINITIONS,
        help="which inactive units the pruned NLL removes: ours (default: Var over the split of E_q[u|x] "
        "<= 0.01) or authors (their code: 500 training images, one sample of h1, units cut from the weights)",
    )
    p.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        help="authors: their evaluation (--units authors, L_k in minibatches of 20)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model for L_k (for GPUs; slower on a CPU)")
    add_run_options(p)
    p.set_defaults(handler=cmd_eval)

    p = subparsers.add_parser("sample", help="PNG of prior samples, reconstructions and interpolations")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", help="PNG path (default RUN/samples.png)")
    p.add_argument("--seed", type=seed, default=0)
    add_run_options(p)
    p.set_defaults(handler=cmd_sample)


TRAIN_SETTINGS = (  # the iwae train arguments that iwae.config.build_train_config takes, under the same names
    "dataset", "objective", "estimator", "M", "beta", "p", "alpha", "k", "layers", "epochs", "schedule", "lr",
    "batch_size", "beta1", "seed", "train_limit", "activation", "latent_dims", "batch_schedule", "lr_scale",
    "k_schedule", "optimizer", "data_order", "loss_reduction", "protocol", "binarization", "train_split",
    "hidden_dims",
)  # fmt: skip


def _train_config(args: argparse.Namespace):
    """The :class:`~iwae.config.TrainConfig` that ``iwae train``'s arguments describe."""
    from iwae.config import build_train_config

    settings = {name: getattr(args, name) for name in TRAIN_SETTINGS}
    settings["init_from"] = str(Path(args.init_from).resolve()) if args.init_from else None
    if args.fresh_optimizer:
        if not args.init_from:
            raise UsageError("iwae train: --fresh-optimizer goes with --init-from RUN")
        settings["fresh_optimizer"] = True
    try:
        return build_train_config(settings)
    except ValueError as error:
        raise UsageError(f"iwae train: {error}") from None


def cmd_train(args: argparse.Namespace) -> dict | list[dict]:
    writable_location(args.out, "--out", "iwae train")  # before torch is imported, and before anything is created
    config = _train_config(args)
    from iwae.fast import allocator

    # Training starts with glibc's malloc thresholds fixed (iwae.fast.allocator): faster steps with large
    # temporaries, at the cost of freed memory kept resident, which eval and sample would pay for nothing.
    allocator.configure()
    options = {
        "resume": args.resume,
        "device": args.device,
        "data_dir": args.data_dir,
        "progress": not args.no_progress,
        "checkpoint_minutes": args.checkpoint_minutes,
        "max_epochs": args.max_epochs,
        "compile_model": args.compile,
    }
    from iwae.runs import resolve_device
    from iwae.stacked import fit_stacked

    if args.seeds is not None:
        configs = [config.replace(seed=seed) for seed in args.seeds]
        results = fit_stacked(configs, [Path(args.out) / f"seed-{seed}" for seed in args.seeds], **options)
        return [_train_summary(c, result) for c, result in zip(configs, results, strict=True)]
    if args.compile and resolve_device(args.device).type == "cuda":
        # On CUDA, --compile means the whole step as a CUDA graph: the stacked step's, for a stack of one.
        return _train_summary(config, fit_stacked([config], [args.out], **options)[0])
    from iwae.train import fit

    return _train_summary(config, fit(config, args.out, **options))


def _train_summary(config, result) -> dict:
    return {
        "run": str(result.run_dir),
        "seed": config.seed,
        "epochs_done": result.epochs_done,
        "epochs_total": config.total_epochs,
        "complete": result.complete,
        "train_bound": result.train_bound,
        f"valid_L{config.valid_k}": result.valid_bound,
        "seconds": round(result.seconds, 2),
        "seconds_per_epoch": round(result.seconds / max(result.epochs_done, 1), 3),
        "gradients": result.gradients,
    }


def cmd_eval(args: argparse.Namespace) -> dict:
    units, batch_size = eval_protocol(args.protocol, args.units, args.batch_size, "iwae eval")
    from iwae.evaluate import evaluate_run
    from iwae.fast import for_evaluation

    result = evaluate_run(
        args.run,
        k=args.k,
        split=args.split,
        limit=args.limit,
        seed=args.seed,
        device=args.device,
        data_dir=args.data_dir,
        prune_inactive=not args.no_prune,
        units=units,
        batch_size=batch_size,
        progress=not args.no_progress,
        compile_model=args.compile,
        accelerate=for_evaluation,
    )
    summary = result.to_dict()
    summary.pop("log_activity")  # long; it stays in eval.json
    return summary


def eval_protocol(protocol: str | None, units: str | None, batch_size: int | None, command: str) -> tuple[str, int]:
    """(units, batch size) of an evaluation: the authors' protocol takes their units and minibatches of 20."""
    if protocol == "authors":
        if units not in (None, "authors") or batch_size not in (None, AUTHORS_EVAL_BATCH):
            raise UsageError(f"{command}: --protocol authors sets --units authors and --batch-size 20; leave them out")
        return "authors", AUTHORS_EVAL_BATCH
    return units or "ours", batch_size or DEFAULT_EVAL_BATCH


def cmd_sample(args: argparse.Namespace) -> dict:
    if args.out is not None:
        writable_location(args.out, "--out", "iwae sample", folder=False)
    from iwae.sampling import sample_run

    path = sample_run(args.run, args.out, seed=args.seed, device=args.device, data_dir=args.data_dir)
    return {"png": str(path)}
