"""``iwae train``, ``iwae eval`` and ``iwae sample``: train a run directory, evaluate it, draw from it.

Each handler returns the JSON object the CLI prints; progress goes to stderr.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from iwae.cli.common import (
    UsageError,
    add_run_options,
    add_setting,
    non_negative_float,
    positive_int,
    seed,
    seed_list,
    writable_location,
)
from iwae.names import AUTHORS_EVAL_BATCH, BINARIZATIONS, EVAL_SPLITS, PROTOCOLS, STACK_CHOICES, UNIT_DEFINITIONS
from iwae.settings import COMMAND_LINE

# Deferred on purpose: everything the handlers call (iwae.train, iwae.evaluate, iwae.sampling, iwae.fast) imports
# torch, which takes seconds that ``iwae --help`` and usage errors should not pay. The imports are inside the
# functions below; the training settings come from iwae.settings and the choices from iwae.names, which import
# nothing heavy.

# iwae eval's largest --k: time grows with k (hours for the test set at this cap: docs/cli.md#iwae-eval), memory does
# not (iwae.evaluate draws the samples in chunks).
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
    groups: dict[str, Any] = {}  # the mutually exclusive groups: --epochs | --schedule, --seed | --seeds
    for setting in COMMAND_LINE:  # the training settings (iwae.settings), in the table's order
        add_setting(p, setting, groups)
        if setting.name == "seed":  # not a setting: one run per seed, stacked; beside --seed in usage
            groups["seed"].add_argument(
                "--seeds",
                type=seed_list,
                metavar="S,S,...",
                help="train these seeds together, each into OUT/seed-S (a complete run directory); see --stack",
            )
    # How this call runs, not what the run is: neither in config.json nor a grid's key (iwae.settings).
    p.add_argument("--checkpoint-minutes", type=non_negative_float, default=2.0, help="checkpoint at least this often")
    p.add_argument("--max-epochs", type=positive_int, help="stop after N epochs of this call (resume later)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument(
        "--compile",
        action="store_true",
        help="on CUDA: each training step captured once as a CUDA graph and replayed; elsewhere: autograd through "
        "torch.compile (model, bound and surrogates as one graph) instead of the default explicit "
        "backpropagation, which is faster on a CPU",
    )
    p.add_argument(
        "--stack",
        choices=STACK_CHOICES,
        default="auto",
        help="the --seeds as one vmapped step of all the models: on, off (each model's own step, a pass at a "
        "time), or auto (default: on CUDA, and a single run with --compile there as CUDA graphs; off on a CPU, "
        "where the models' own fast steps are faster)",
    )
    p.add_argument("--out", required=True, help="run directory")
    add_run_options(p)
    p.set_defaults(handler=cmd_train)

    p = subparsers.add_parser("eval", help="test NLL (L_k), active units, KL and reconstruction terms")
    p.add_argument("run", help="run directory")
    p.add_argument("--k", type=eval_k, default=5000,
                   help=f"samples per example of L_k (default 5000, at most {MAX_EVAL_K:,})")  # fmt: skip
    p.add_argument("--split", default=EVAL_SPLITS[0], choices=EVAL_SPLITS)
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
    p.add_argument(
        "--binarization",
        choices=BINARIZATIONS,
        help="evaluate on grey-level images binarised otherwise than the run trained on: dynamic (one draw with "
        "--seed) or threshold (pixel >= 0.5); default: the run's own",
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


# The iwae train arguments that iwae.config.build_train_config takes, under the same names: the settings' options.
TRAIN_SETTINGS: tuple[str, ...] = tuple(setting.name for setting in COMMAND_LINE)


def _train_config(args: argparse.Namespace):
    """The :class:`~iwae.config.TrainConfig` that ``iwae train``'s arguments describe."""
    from iwae.config import build_train_config

    settings = {name: getattr(args, name) for name in TRAIN_SETTINGS}  # None: left out, the builder's default
    from iwae.files import resolved

    try:
        settings["init_from"] = str(resolved(args.init_from, "--init-from")) if args.init_from else None
    except ValueError as error:
        raise UsageError(f"iwae train: {error}") from None
    if args.fresh_optimizer and not args.init_from:
        raise UsageError("iwae train: --fresh-optimizer goes with --init-from RUN")
    try:
        return build_train_config(settings)
    except ValueError as error:
        raise UsageError(f"iwae train: {error}") from None


def cmd_train(args: argparse.Namespace) -> dict | list[dict]:
    writable_location(args.out, "--out", "iwae train")  # before torch is imported, and before anything is created
    config = _train_config(args)
    from iwae.fast import allocator

    # Training starts with glibc's malloc thresholds fixed (iwae.fast.allocator): no page faults for large
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
        "stack": args.stack,
    }
    from iwae.train import fit_runs

    if args.seeds is not None:
        from iwae.files import check_derived

        configs = [config.replace(seed=seed) for seed in args.seeds]
        run_dirs = [Path(args.out) / f"seed-{seed}" for seed in args.seeds]
        for run_dir in run_dirs:  # folders this command names itself: never through a link
            check_derived(run_dir, "the seed's run folder")
        results = fit_runs(configs, run_dirs, **options)
        return [_train_summary(c, result) for c, result in zip(configs, results, strict=True)]
    return _train_summary(config, fit_runs([config], [args.out], **options)[0])


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
        binarization=args.binarization,
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
