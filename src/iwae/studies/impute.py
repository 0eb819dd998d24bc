"""MIWAE: training on incomplete data and imputing the missing entries (Mattei and Frellsen 2019).

Entries go missing completely at random (MCAR, a seeded mask). The model is trained on the observed
entries only, maximising sum_i log (1/K) sum_k p(x_i^obs | z_ik) p(z_ik) / q(z_ik | x_i^obs), with the
missing entries set to 0 at the encoder's input. The missing entries are then imputed

- by self-normalised importance sampling (single imputation): x^miss = sum_l w~_l E[x^miss | z_l];
- by sampling-importance-resampling (multiple imputation): pick z_l with probability w~_l and draw
  x^miss ~ p(x^miss | z_l); the spread of the draws shows the imputation's uncertainty.

Baselines: mean imputation (column means of the observed entries) and the same model trained with
K = 1 (the ELBO). The error is measured on the missing entries only: MSE, and for standardised
tables the RMSE, which is the NRMSE since every column has unit variance.

Shape convention: data and masks ``[batch, x_dim]`` (mask 1 = observed); samples ``[L, batch, ...]``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from iwae.bounds import iwae_bound
from iwae.models import LatentVariableModel, ModelConfig


@dataclass(frozen=True)
class ImputeSettings:
    missing: float = 0.5
    k: int = 20
    epochs: int = 100
    batch_size: int = 64
    lr: float = 1e-3
    latent_dim: int = 10
    hidden: tuple[int, ...] = (128, 128)
    n_impute: int = 1000  # importance samples per example for imputation
    n_multiple: int = 20  # SIR imputations per example
    seed: int = 0


def mcar_mask(shape: tuple[int, int], missing: float, generator: torch.Generator) -> Tensor:
    """1 = observed, 0 = missing; each entry missing independently with probability ``missing``."""
    if not 0.0 < missing < 1.0:
        raise ValueError(f"the missing rate must be in (0, 1), got {missing}")
    return (torch.rand(shape, generator=generator) >= missing).float()


def load_table(name: str, seed: int = 0, limit: int | None = None) -> tuple[Tensor, str]:
    """A complete data table ``[n, p]`` and its likelihood (``"bernoulli"`` or ``"gaussian"``).

    ``mnist``: the first ``limit`` training images (2,000 if None), binarised once with ``seed``, Bernoulli.
    ``breast-cancer``: 569 x 30, standardised, Gaussian.
    """
    if name == "mnist":
        from iwae.data import load_dataset

        images = load_dataset("mnist", progress=False).train.subset(limit or 2000).images
        return torch.bernoulli(images, generator=torch.Generator().manual_seed(seed)), "bernoulli"
    if name == "breast-cancer":
        try:
            from sklearn.datasets import load_breast_cancer
        except ImportError:
            raise ValueError("the breast-cancer table needs scikit-learn: pip install 'iwae[tabular]'") from None
        table = torch.tensor(load_breast_cancer().data, dtype=torch.float32)
        table = table[:limit] if limit else table
        return (table - table.mean(dim=0)) / table.std(dim=0), "gaussian"
    raise ValueError(f"unknown table {name!r}; choose mnist or breast-cancer")


def train_miwae(x: Tensor, mask: Tensor, likelihood: str, k: int, settings: ImputeSettings, progress: bool = False):
    """The MIWAE bound on the observed entries (k = 1: the ELBO); returns the model (eval mode)."""
    torch.manual_seed(settings.seed)
    config = ModelConfig(x.shape[1], (settings.latent_dim,), (tuple(settings.hidden),), "tanh", likelihood)
    model = LatentVariableModel(config)
    if likelihood == "bernoulli":
        observed_mean = (x * mask).sum(dim=0) / mask.sum(dim=0).clamp_min(1)
        model.set_output_bias(observed_mean)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr, eps=1e-4)
    generator = torch.Generator().manual_seed(settings.seed + 1)
    x_in = x * mask
    n = x.shape[0]
    for _ in tqdm(range(settings.epochs), desc=f"MIWAE K={k}", disable=not progress):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, settings.batch_size):
            idx = order[start : start + settings.batch_size]
            sample = model(x_in[idx], k, generator, observed_mask=mask[idx])
            loss = -iwae_bound(sample.log_w).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def impute(
    model: LatentVariableModel,
    x: Tensor,
    mask: Tensor,
    n_samples: int,
    n_multiple: int,
    generator: torch.Generator,
    max_rows: int = 4_000_000,
) -> tuple[Tensor, Tensor]:
    """Single (SNIS) and multiple (SIR) imputations: ``[n, p]`` and ``[n_multiple, n, p]``.

    Observed entries are kept as they are in both; only missing entries are filled in.

    Args:
        model: a model trained on the observed entries (:func:`train_miwae`).
        x: ``[n, p]`` the table (its missing entries are not read).
        mask: ``[n, p]``, 1 = observed.
        n_samples: L, the importance samples per row.
        n_multiple: the SIR imputations per row.
        generator: the random source.
        max_rows: sample rows (``L * p`` per example) held at once; rows are taken in chunks below it.
    """
    x_in = x * mask
    batch = max(1, max_rows // (n_samples * x.shape[1]))
    single, multiple = [], []
    for start in range(0, x.shape[0], batch):
        xb, mb = x_in[start : start + batch], mask[start : start + batch]
        sample = model(xb, n_samples, generator, observed_mask=mb)
        weights = torch.softmax(sample.log_w.double(), dim=0)  # [L, b]
        params = model.decoder[0](sample.latents[0])
        mean = model.observation_mean(sample.latents[0])  # [L, b, p]
        single.append((weights[..., None] * mean.double()).sum(dim=0).float())
        picks = torch.multinomial(weights.T, n_multiple, replacement=True, generator=generator)  # [b, M]
        chosen = torch.stack([mean[picks[:, m], torch.arange(xb.shape[0])] for m in range(n_multiple)])  # [M, b, p]
        if model.config.likelihood == "bernoulli":
            draws = torch.bernoulli(chosen, generator=generator)
        else:
            log_std = params[1]
            std = torch.stack([torch.exp(log_std[picks[:, m], torch.arange(xb.shape[0])]) for m in range(n_multiple)])
            draws = chosen + std * torch.randn(chosen.shape, generator=generator)
        multiple.append(draws)
    fill_single = torch.cat(single)
    fill_multiple = torch.cat(multiple, dim=1)
    return x_in + (1 - mask) * fill_single, x_in + (1 - mask) * fill_multiple


def mean_imputation(x: Tensor, mask: Tensor) -> Tensor:
    """Missing entries replaced by the mean of their column's observed entries."""
    column_mean = (x * mask).sum(dim=0) / mask.sum(dim=0).clamp_min(1)
    return x * mask + (1 - mask) * column_mean


def missing_mse(x: Tensor, imputed: Tensor, mask: Tensor) -> float:
    """Mean squared error over the missing entries only."""
    missing = 1 - mask
    return float((((imputed - x) ** 2) * missing).sum() / missing.sum())


@dataclass
class ImputeResult:
    """The study's outcome: the table, the missing rate, the error per method (MSE and RMSE), the SIR spread."""

    dataset: str
    likelihood: str
    n: int
    p: int
    missing: float
    metric: str
    mse: dict[str, float]
    rmse: dict[str, float]
    sir_spread: float  # mean over missing entries of the std across the SIR imputations
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate_imputations(
    x: Tensor, mask: Tensor, likelihood: str, settings: ImputeSettings, progress: bool = False
) -> tuple[dict[str, float], float]:
    """MSE on the missing entries for MIWAE (single and multiple), the K = 1 model and mean imputation."""
    mse = {"mean": missing_mse(x, mean_imputation(x, mask), mask)}
    spread = float("nan")
    for label, k in ((f"miwae_k{settings.k}", settings.k), ("elbo_k1", 1)):
        model = train_miwae(x, mask, likelihood, k, settings, progress)
        generator = torch.Generator().manual_seed(settings.seed + 2)
        single, multiple = impute(model, x, mask, settings.n_impute, settings.n_multiple, generator)
        mse[f"{label}_snis"] = missing_mse(x, single, mask)
        mse[f"{label}_sir_each"] = float(np.mean([missing_mse(x, m, mask) for m in multiple]))
        mse[f"{label}_sir_average"] = missing_mse(x, multiple.mean(dim=0), mask)
        if k == settings.k:
            spread = float((multiple.std(dim=0) * (1 - mask)).sum() / (1 - mask).sum())
    return mse, spread


def markdown_table(result: ImputeResult) -> str:
    lines = [f"| method ({result.dataset}, {result.missing:.0%} MCAR) | MSE | RMSE |", "|---|---|---|"]
    lines += [f"| {name} | {value:.4f} | {result.rmse[name]:.4f} |" for name, value in result.mse.items()]
    return "\n".join(lines)


def impute_run(
    dataset: str, settings: ImputeSettings, out_dir: str | Path, limit: int | None = None, progress: bool = True
) -> dict:
    """Load a table, mask it, train MIWAE and the ELBO model, impute, and write ``impute.json``/``impute.md``."""
    from iwae.checkpoint import atomic_write_text

    started = time.perf_counter()
    x, likelihood = load_table(dataset, settings.seed, limit)
    mask = mcar_mask(tuple(x.shape), settings.missing, torch.Generator().manual_seed(settings.seed))
    mse, spread = evaluate_imputations(x, mask, likelihood, settings, progress)
    metric = (
        "squared error on missing binarised pixels (imputations are probabilities for SNIS, 0/1 draws for SIR)"
        if likelihood == "bernoulli"
        else "squared error on missing standardised entries (RMSE = NRMSE)"
    )
    result = ImputeResult(
        dataset, likelihood, x.shape[0], x.shape[1], settings.missing, metric, mse,
        {name: float(np.sqrt(v)) for name, v in mse.items()}, spread, round(time.perf_counter() - started, 1),
    )  # fmt: skip
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(result)
    atomic_write_text(out / "impute.md", table + "\n")
    payload = {**result.to_dict(), "settings": asdict(settings), "markdown": table, "table": str(out / "impute.md")}
    atomic_write_text(out / "impute.json", json.dumps(payload, indent=2) + "\n")
    return payload
