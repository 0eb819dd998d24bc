"""Anomaly scores from a trained model (Lu and Xu 2018) and their AUROC.

Six scores per example, all from the same L samples z_l ~ q(z | x) (higher = more anomalous):

- ``vae``: KL - mean_l log p(x | z_l), with KL estimated by mean_l [log q(z_l | x) - log p(z_l)];
- ``vae_kl`` and ``vae_recon``: its two parts;
- ``iwae``: -log (1/L) sum_l p(x | z_l) p(z_l) / q(z_l | x)  (= -L_L);
- ``iwae_kl``: -log (1/L) sum_l p(z_l) / q(z_l | x);  ``iwae_recon``: -log (1/L) sum_l p(x | z_l).

With L = 1 each IWAE score equals its VAE counterpart; for any L each IWAE score is at most its
VAE counterpart (Jensen). AUROC is the Mann-Whitney statistic computed from average ranks (ties
count one half), with anomalies as the positive class.

Shape convention: data ``[batch, x_dim]``; per-sample log-densities ``[L, batch]``; scores ``[batch]``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from iwae.bounds import log_mean_exp
from iwae.checkpoint import atomic_save_figure, atomic_write_text
from iwae.data import Dataset, Split, binarize, load_dataset
from iwae.models import LatentVariableModel

SCORES = ("vae", "vae_kl", "vae_recon", "iwae", "iwae_kl", "iwae_recon")


def scores_from_sample(log_px: Tensor, log_prior: Tensor, log_q: Tensor) -> dict[str, Tensor]:
    """The six scores from ``[L, batch]`` log-densities; float64 ``[batch]`` each."""
    log_px, log_prior, log_q = log_px.double(), log_prior.double(), log_q.double()
    vae_kl = (log_q - log_prior).mean(dim=0)
    vae_recon = -log_px.mean(dim=0)
    return {
        "vae": vae_kl + vae_recon,
        "vae_kl": vae_kl,
        "vae_recon": vae_recon,
        "iwae": -log_mean_exp(log_px + log_prior - log_q, dim=0),
        "iwae_kl": -log_mean_exp(log_prior - log_q, dim=0),
        "iwae_recon": -log_mean_exp(log_px, dim=0),
    }


@torch.no_grad()
def anomaly_scores(
    model: torch.nn.Module,
    images: Tensor,
    binarization: str,
    n_samples: int,
    generator: torch.Generator,
    batch_size: int = 100,
    progress: bool = False,
) -> dict[str, Tensor]:
    """The six scores for every example (binarised once), ``[n]`` float64 each, on the CPU."""
    out: dict[str, list[Tensor]] = {name: [] for name in SCORES}
    for start in tqdm(range(0, images.shape[0], batch_size), desc="scores", disable=not progress):
        x = binarize(images[start : start + batch_size], binarization, generator)
        sample = model(x, n_samples, generator)
        for name, value in scores_from_sample(sample.log_px_given_h, sample.log_prior, sample.log_q).items():
            out[name].append(value.cpu())
    return {name: torch.cat(values) for name, values in out.items()}


# -- ROC ----------------------------------------------------------------------------------------
def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_values)) + 1]  # first index of each tie group
    ends = np.r_[starts[1:], len(values)]
    group_rank = (starts + ends + 1) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.repeat(group_rank, ends - starts)
    return ranks


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """P(score of a positive > score of a negative) + 0.5 P(tie); ``labels`` 1 = positive (anomaly)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative example")
    ranks = average_ranks(scores)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0) to (1, 1)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    last_of_group = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # thresholds between distinct scores
    tp = np.cumsum(y)[last_of_group]
    fp = np.cumsum(~y)[last_of_group]
    return np.r_[0.0, fp / max(1, (~labels).sum())], np.r_[0.0, tp / max(1, labels.sum())]


# -- experiments --------------------------------------------------------------------------------
def evaluate_scores(normal: dict[str, Tensor], anomalous: dict[str, Tensor]) -> dict[str, dict]:
    """AUROC and ROC curve per score."""
    out = {}
    for name in SCORES:
        scores = np.concatenate([normal[name].numpy(), anomalous[name].numpy()])
        labels = np.r_[np.zeros(len(normal[name])), np.ones(len(anomalous[name]))]
        fpr, tpr = roc_curve(scores, labels)
        out[name] = {"auroc": auroc(scores, labels), "fpr": fpr, "tpr": tpr}
    return out


def without_digit(data: Dataset, digit: int) -> Dataset:
    """MNIST with one digit removed from the training and validation splits (the test split kept whole)."""

    def keep(split: Split) -> Split:
        if split.labels is None:
            raise ValueError(f"dataset {data.name} has no labels; --holdout-digit needs MNIST")
        mask = split.labels != digit
        return Split(split.images[mask], split.labels[mask])

    return Dataset(f"{data.name}-without-{digit}", keep(data.train), keep(data.valid), data.test, data.binarization)


def train_holdout(base_config, digit: int, run_dir: Path, epochs: int, train_limit: int | None, device: str,
                  data: Dataset, progress: bool) -> LatentVariableModel:  # fmt: skip
    """A model like ``base_config`` (architecture, objective, k) trained on MNIST without ``digit``.

    Reuses a finished model in ``run_dir``; resumes an unfinished one with the same settings.
    """
    from iwae.runs import MODEL_FILE, load_model
    from iwae.train import fit

    run_dir = Path(run_dir)
    if not (run_dir / MODEL_FILE).is_file():
        config = base_config.replace(stages=((epochs, 1e-3),), train_limit=train_limit)
        fit(config, run_dir, resume=True, device=device, dataset=without_digit(data, digit), progress=progress)
        atomic_write_text(run_dir / "holdout.json", json.dumps({"holdout_digit": digit}) + "\n")
    model, _ = load_model(run_dir, device)
    return model


def plot_rocs(experiments: dict[str, dict[str, dict]], path: Path) -> Path:
    """Every score's ROC curve, one panel per experiment, as one PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(experiments), figsize=(5.2 * len(experiments), 4.6), squeeze=False)
    for axis, (title, results) in zip(axes[0], experiments.items(), strict=True):
        for i, name in enumerate(SCORES):
            style = "-" if name.startswith("iwae") else "--"
            r = results[name]
            axis.plot(r["fpr"], r["tpr"], style, color=f"C{i % 3}", label=f"{name} ({r['auroc']:.3f})")
        axis.plot([0, 1], [0, 1], ":", color="grey")
        axis.set_title(title, fontsize=9)
        axis.set_xlabel("false positive rate")
        axis.set_ylabel("true positive rate")
        axis.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    atomic_save_figure(path, fig, dpi=100)
    plt.close(fig)
    return path


def markdown_table(experiments: dict[str, dict[str, dict]]) -> str:
    """AUROC per score (rows) and experiment (columns), as a Markdown table."""
    names = list(experiments)
    lines = ["| score | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for score in SCORES:
        lines.append(f"| {score} | " + " | ".join(f"{experiments[n][score]['auroc']:.4f}" for n in names) + " |")
    return "\n".join(lines)


def anomaly_run(
    run_dir: str | Path,
    *,
    n_samples: int = 100,
    limit: int | None = 1000,
    holdout_digit: int | None = None,
    holdout_run: str | Path | None = None,
    holdout_epochs: int = 5,
    holdout_train_limit: int | None = None,
    out_dir: str | Path | None = None,
    seed: int = 0,
    device: str = "auto",
    data_dir: str | None = None,
    progress: bool = True,
) -> dict:
    """The anomaly study of an MNIST run; writes ``anomaly.md``, ``anomaly.json`` and ``roc.png``.

    MNIST test (normal) vs Fashion-MNIST test (anomalous) with the run's model and, with ``holdout_digit``, MNIST
    test without that digit (normal) vs that digit (anomalous) with a model trained without it.

    Args:
        run_dir: a run trained on MNIST.
        n_samples: L, the samples per example behind every score.
        limit: examples per side (None: all).
        holdout_digit: the digit to hold out, or None for the first experiment only.
        holdout_run: a run already trained without the digit; otherwise one is trained (or resumed) under
            ``OUT/holdout-<digit>`` like ``run_dir`` (:func:`train_holdout`).
        holdout_epochs: that training's epochs.
        holdout_train_limit: that training's examples (None: all).
        out_dir: where the files go (default ``RUN/anomaly``).
        seed: the random source of binarisation and samples.
        device: as :func:`iwae.runs.resolve_device` takes it.
        data_dir: where the datasets are looked for.
        progress: show progress bars.

    Returns:
        The AUROCs per experiment and score, the paths written and the Markdown table.
    """
    from iwae.runs import load_model, resolve_device

    torch_device = resolve_device(device)
    model, config = load_model(Path(run_dir), torch_device)
    if config.dataset != "mnist":
        raise ValueError(f"the anomaly study needs a model trained on MNIST, {run_dir} was trained on {config.dataset}")
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "anomaly"
    out.mkdir(parents=True, exist_ok=True)
    mnist = load_dataset("mnist", data_dir, progress=progress)
    fashion = load_dataset("fashion-mnist", data_dir, progress=progress)
    generator = torch.Generator(device=torch_device).manual_seed(seed)

    def score(m: torch.nn.Module, images: Tensor) -> dict[str, Tensor]:
        return anomaly_scores(m, images.to(torch_device), "dynamic", n_samples, generator, progress=progress)

    experiments = {
        "MNIST vs Fashion-MNIST": evaluate_scores(
            score(model, mnist.test.subset(limit).images), score(model, fashion.test.subset(limit).images)
        )
    }
    if holdout_digit is not None:
        if holdout_run is not None:
            held_model, _ = load_model(Path(holdout_run), torch_device)
        else:
            held_model = train_holdout(config, holdout_digit, out / f"holdout-{holdout_digit}", holdout_epochs,
                                       holdout_train_limit, str(torch_device), mnist, progress)  # fmt: skip
        test = mnist.test
        is_digit = test.labels == holdout_digit
        normal, anomalous = test.images[~is_digit], test.images[is_digit]
        if limit is not None:
            normal, anomalous = normal[:limit], anomalous[:limit]
        experiments[f"MNIST: digit {holdout_digit} held out"] = evaluate_scores(
            score(held_model, normal), score(held_model, anomalous)
        )
    table = markdown_table(experiments)
    atomic_write_text(out / "anomaly.md", table + "\n")
    result = {
        "run": str(run_dir),
        "L": n_samples,
        "limit": limit,
        "auroc": {title: {s: r[s]["auroc"] for s in SCORES} for title, r in experiments.items()},
        "table": str(out / "anomaly.md"),
        "png": str(plot_rocs(experiments, out / "roc.png")),
        "markdown": table,
    }
    atomic_write_text(out / "anomaly.json", json.dumps(result, indent=2) + "\n")
    return result
