"""The ``iwae`` command line: ``iwae train``, ``iwae eval``, ``iwae sample``.

Only this module reads ``sys.argv``. Bad arguments and missing files end with a one-line
error on stderr and exit code 2; results go to stdout as one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from iwae.cli.common import positive_int
from iwae.fast import allocator

EXIT_USAGE = 2
# Commands that run training steps start with glibc's malloc thresholds fixed (iwae.fast.allocator): faster steps with
# large temporaries, at the cost of freed memory kept resident, which evaluation alone would pay for nothing.
FIXED_MALLOC_COMMANDS = ("train", "bench")


class UsageError(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _add_common(parser: argparse.ArgumentParser) -> None:
    from iwae.cli.common import add_run_options

    add_run_options(parser)


def _train_parser(sub) -> None:
    from iwae.data import DATASETS

    p = sub.add_parser("train", help="train a VAE or IWAE", description="Train a VAE or IWAE (Burda et al.).")
    p.add_argument("--dataset", default="mnist", choices=DATASETS)
    p.add_argument(
        "--objective",
        default="iwae",
        choices=["vae", "iwae", "miwae", "ciwae", "piwae", "power", "vr"],
        help="bound to train (miwae/piwae need --M, ciwae --beta, power --p, vr --alpha)",
    )
    p.add_argument("--estimator", default="standard", choices=["standard", "stl", "dreg"], help="gradient estimator")
    p.add_argument("--M", type=positive_int, default=1, help="miwae/piwae: split the k samples into M groups")
    p.add_argument("--beta", type=float, help="ciwae: weight of the ELBO, 0..1")
    p.add_argument("--p", type=float, help="power: the power-mean exponent (<= 1; 1 is IWAE, 0 the ELBO)")
    p.add_argument("--alpha", type=float, help="vr: the VR-IWAE alpha (>= 0; 0 is IWAE, 1 the ELBO)")
    p.add_argument("--k", type=positive_int, default=1, help="samples per example (default 1)")
    p.add_argument("--layers", type=int, default=1, choices=[1, 2], help="stochastic layers (Burda's nets)")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--epochs", type=positive_int, help="one stage of N passes at --lr")
    when.add_argument("--schedule", help="'burda' (3,280 passes, default) or 'burda:S' (its first S stages)")
    p.add_argument("--lr", type=float, help="learning rate with --epochs (default 1e-3)")
    p.add_argument("--batch-size", type=positive_int, default=20)
    p.add_argument("--beta1", type=float, default=0.9, help="Adam beta1 (paper 0.9; the authors' code 0.99)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-limit", type=positive_int, help="train on the first N training examples only")
    p.add_argument("--activation", default="tanh", choices=["tanh", "relu", "softplus"])
    p.add_argument("--latent-dims", help="override latent sizes, e.g. '2' or '100,50'")
    p.add_argument("--checkpoint-minutes", type=float, default=2.0, help="checkpoint at least this often")
    p.add_argument("--max-epochs", type=positive_int, help="stop after N epochs of this call (resume later)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out where it stopped")
    p.add_argument(
        "--compile",
        action="store_true",
        help="autograd through torch.compile (model, bound and surrogates as one graph) instead of the default "
        "explicit backpropagation, which was faster on a 2-core CPU",
    )
    p.add_argument("--init-from", metavar="RUN", help="start from a finished run's final weights (Burda's Table 2)")
    p.add_argument("--out", required=True, help="run directory")
    _add_common(p)


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="test NLL (L_k), active units, KL and reconstruction terms")
    p.add_argument("run", help="run directory")
    p.add_argument("--k", type=positive_int, default=5000)
    p.add_argument("--split", default="test", choices=["test", "train", "valid"])
    p.add_argument("--limit", type=positive_int, help="only the first N examples of the split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--no-prune", action="store_true", help="skip the NLL with inactive units removed")
    p.add_argument("--compile", action="store_true", help="torch.compile the model for L_k (for GPUs; slower on a CPU)")
    _add_common(p)


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="PNG of prior samples, reconstructions and interpolations")
    p.add_argument("run", help="run directory")
    p.add_argument("--out", help="PNG path (default RUN/samples.png)")
    p.add_argument("--seed", type=int, default=0)
    _add_common(p)


# Further commands live in their own modules under ``iwae.cli``; each module defines
# ``register(subparsers)``, which adds its parser with ``set_defaults(handler=fn)``, where ``fn``
# takes the parsed arguments and returns the JSON-serialisable result to print.
COMMAND_MODULES: list[str] = [
    "iwae.cli.snr",
    "iwae.cli.sweep",
    "iwae.cli.analyses",
    "iwae.cli.bench",
]


def build_parser() -> argparse.ArgumentParser:
    import importlib

    from iwae import __version__

    parser = _Parser(prog="iwae", description="Importance-weighted variational inference (VAE, IWAE).")
    parser.add_argument("--version", action="version", version=f"iwae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_parser(sub)
    _eval_parser(sub)
    _sample_parser(sub)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def _train_config(args: argparse.Namespace):
    from iwae.config import TrainConfig, parse_schedule
    from iwae.models import ModelConfig

    try:
        stages = parse_schedule(args.schedule, args.epochs, args.lr)
    except ValueError as error:
        raise UsageError(f"iwae train: {error}") from None
    model = ModelConfig.burda(args.layers)
    if args.latent_dims:
        dims = tuple(int(d) for d in args.latent_dims.split(","))
        if len(dims) != args.layers:
            raise UsageError(f"iwae train: --latent-dims needs {args.layers} size(s), got {args.latent_dims!r}")
        model = ModelConfig(model.x_dim, dims, model.hidden_dims, args.activation, model.likelihood)
    elif args.activation != model.activation:
        model = ModelConfig(model.x_dim, model.latent_dims, model.hidden_dims, args.activation, model.likelihood)
    return TrainConfig(
        dataset=args.dataset,
        objective=args.objective,
        k=args.k,
        model=model,
        stages=stages,
        batch_size=args.batch_size,
        beta1=args.beta1,
        seed=args.seed,
        train_limit=args.train_limit,
        estimator=args.estimator,
        M=args.M,
        beta=args.beta,
        p=args.p,
        alpha=args.alpha,
        init_from=str(Path(args.init_from).resolve()) if args.init_from else None,
    )


def cmd_train(args: argparse.Namespace) -> dict:
    from iwae.train import fit

    config = _train_config(args)
    result = fit(
        config,
        args.out,
        resume=args.resume,
        device=args.device,
        data_dir=args.data_dir,
        progress=not args.no_progress,
        checkpoint_minutes=args.checkpoint_minutes,
        max_epochs=args.max_epochs,
        compile_model=args.compile,
    )
    return {
        "run": str(result.run_dir),
        "epochs_done": result.epochs_done,
        "epochs_total": config.total_epochs,
        "complete": result.complete,
        "train_bound": result.train_bound,
        f"valid_L{config.valid_k}": result.valid_bound,
        "seconds": round(result.seconds, 2),
        "seconds_per_epoch": round(result.seconds / max(result.epochs_done, 1), 3),
    }


def cmd_eval(args: argparse.Namespace) -> dict:
    from iwae.evaluate import evaluate_run

    result = evaluate_run(
        args.run,
        k=args.k,
        split=args.split,
        limit=args.limit,
        seed=args.seed,
        device=args.device,
        data_dir=args.data_dir,
        prune_inactive=not args.no_prune,
        batch_size=args.batch_size,
        progress=not args.no_progress,
        compile_model=args.compile,
    )
    summary = result.to_dict()
    summary.pop("log_activity")  # long; it stays in eval.json
    return summary


def cmd_sample(args: argparse.Namespace) -> dict:
    from iwae.sampling import sample_run

    path = sample_run(args.run, args.out, seed=args.seed, device=args.device, data_dir=args.data_dir)
    return {"png": str(path)}


COMMANDS: dict[str, Callable[[argparse.Namespace], dict]] = {
    "train": cmd_train,
    "eval": cmd_eval,
    "sample": cmd_sample,
}


def main(argv: Sequence[str] | None = None) -> int:
    from iwae.data import DataError
    from iwae.runs import RunError

    try:
        args = build_parser().parse_args(argv)
        if getattr(args, "run", None) is not None and not Path(args.run).is_dir():
            raise UsageError(f"iwae {args.command}: no run directory {args.run!r}; train one with 'iwae train'")
        handler = getattr(args, "handler", None) or COMMANDS[args.command]
        if args.command in FIXED_MALLOC_COMMANDS:
            allocator.configure()
        payload = handler(args)
    except (UsageError, DataError, RunError, FileNotFoundError) as error:
        print(f"error: {error}" if not isinstance(error, UsageError) else str(error), file=sys.stderr)
        return EXIT_USAGE
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted: the last checkpoint is kept; continue with the same command and --resume", file=sys.stderr)
        return 130
    print(json.dumps(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
