"""Evaluation: test log-likelihood from L_k (k = 5000), active units, reconstruction and KL terms.

Shape convention: examples ``[batch, x_dim]``; log-weights ``[k, batch]``. The k samples of an
example are drawn in chunks so memory stays bounded whatever k is, and the log-mean-exp over
chunks is accumulated in float64 (:class:`iwae.bounds.LogMeanExpAccumulator`).

Active units (Burda et al., section 5.2), two definitions, each under its own name:

- ours (``active_units``, :func:`activity`): ``A_u = Var_x(E_q[u | x])`` over the evaluated split (sample
  variance); a unit is active if ``A_u > 0.01``. For the first layer ``E_q[h_1 | x]`` is q's mean; for deeper
  layers it is a Monte Carlo average of q's mean over 100 samples of the layer below.
- the authors' (``active_units_authors``, :func:`authors_unit_variances`), as their code (github yburda/iwae,
  iwae.py ``get_units_variances``) computes it: the first 500 training images, binarised once; layer j's
  encoder mean given ONE sample of h_{j-1} (the sample drawn from q for that image); ``np.var`` (population
  variance, ddof = 0); a unit is kept if its variance is ``>= 0.01``.

The definition some reports use, mean KL(q(u | .) || p(u | .)) > 0.01 (``active_units_kl``), is reported as well.

The pruned NLL (``nll_active_only``, "dead units removed") is L_k of the model without its inactive units; the
``units`` argument of :func:`evaluate_model` chooses whose: ``"ours"`` masks the units inactive by our definition
(``unit_masks`` in :meth:`iwae.models.LatentVariableModel.forward`); ``"authors"`` cuts the units the authors'
variances drop out of the weight matrices (:meth:`iwae.models.LatentVariableModel.without_units`, their
``chop_units_with_variance_under_threshold``). ``pruned_by`` in the result says which.

:func:`evaluate_run` keeps earlier results: each goes to a file named by its settings,
``eval-<split>-k<K>-seed<S>[-limit<N>][-authors][-<binarization>].json`` (the same settings replace their file), and to
``eval.json``, the latest. Beside each named file goes ``<its stem>.per-example.safetensors``: L_k of every example
(and the pruned L_k), with the digest of the binary examples (``images_sha256``, also in the JSON), so that two models
scored on the same examples can be compared by the paired difference, whose standard error is far smaller than
either NLL's (:func:`paired_nll_difference`). A model with non-finite parameters or a non-finite NLL raises
:class:`~iwae.runs.RunError` and writes nothing.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from iwae.bounds import LogMeanExpAccumulator
from iwae.checkpoint import atomic_write_text, load_per_example, save_per_example, tensors_digest
from iwae.data import Dataset, Split, binarize, for_run, load_dataset
from iwae.models import LatentVariableModel
from iwae.names import BINARIZATIONS, UNIT_DEFINITIONS
from iwae.protocol import Model
from iwae.runs import EVAL_FILE, RunError, load_model, resolve_device

ACTIVE_THRESHOLD = 0.01
AUTHORS_IMAGES = 500  # the authors' active units: the first 500 training images
PER_EXAMPLE_SUFFIX = ".per-example.safetensors"  # beside an evaluation's named JSON file (per_example_file)
# Sample rows per chunk of L_k (``[rows, x_dim]`` logits at a time): 16 MB on a CPU, where larger chunks gain
# nothing; on a GPU large chunks (0.8 GB for MNIST) keep the device busy, with the log-mean-exp still in float64.
CHUNK_ROWS = {"cpu": 5_000, "cuda": 250_000}


def chunk_rows(device: torch.device) -> int:
    """:data:`CHUNK_ROWS` for the device (the CPU's for devices not listed)."""
    return CHUNK_ROWS.get(device.type, CHUNK_ROWS["cpu"])


@dataclass
class EvalResult:
    nll: float
    nll_std_err: float
    k: int
    split: str
    n_examples: int
    seed: int
    active_units: list[int]
    active_units_authors: list[int] | None
    active_units_kl: list[int]
    nll_active_only: float | None
    recon_log_lik: float
    kl: float
    elbo: float
    seconds: float
    log_activity: list[list[float]] = field(default_factory=list)
    # Whose inactive units nll_active_only leaves out: "ours" (masked by active_units' variances over the evaluated
    # split) or "authors" (cut out of the weights by the authors' variances, active_units_authors).
    pruned_by: str = "ours"
    log_activity_authors: list[list[float]] = field(default_factory=list)  # log of the authors' variances
    images_sha256: str = ""  # :func:`examples_digest` of the examples scored: equal digests, the same binary images
    # Float64 ``[n_examples]`` values, in the split's order: ``log_lik`` (L_k) and, with a pruned NLL,
    # ``log_lik_active``. Not in :meth:`to_dict`: :func:`evaluate_run` writes them to a file of their own.
    per_example: dict[str, Tensor] = field(default_factory=dict, repr=False, compare=False)

    def to_dict(self) -> dict:
        data = asdict(replace(self, per_example={}))
        del data["per_example"]
        return data


def examples_digest(images: Tensor, binarization: str) -> str:
    """``sha256:<hex>`` of the examples an evaluation scores: the images as L_k receives them (for ``dynamic``, the
    one draw already made) and how they are binarised, which together fix the binary images."""
    return tensors_digest({binarization: images.to(torch.float32)})


@dataclass(frozen=True)
class PairedDifference:
    """``nll`` of model a minus model b on the same examples, with the standard error of the per-example
    differences (nats)."""

    difference: float
    std_err: float
    n_examples: int


def per_example_file(eval_file: str | Path) -> Path:
    """The per-example file beside an evaluation's JSON file (``eval-test-k5000-seed0.json`` ->
    ``eval-test-k5000-seed0.per-example.safetensors``)."""
    eval_file = Path(eval_file)
    return eval_file.with_name(eval_file.stem + PER_EXAMPLE_SUFFIX)


def paired_nll_difference(a: str | Path, b: str | Path, key: str = "log_lik") -> PairedDifference:
    """The NLL of evaluation ``a`` minus that of ``b``, from their per-example files (or the evaluation JSON files
    beside them), with the standard error of the paired differences: the same examples (equal
    ``images_sha256``) make the two models' errors largely cancel.

    Raises:
        ValueError: one line, if a file is missing or damaged, or the two scored other examples.
    """
    values = []
    for given in (a, b):
        path = Path(given)
        path = path if path.name.endswith(PER_EXAMPLE_SUFFIX) else per_example_file(path)
        if not path.is_file():
            raise ValueError(f"no per-example values at {path}; evaluate the run again (iwae eval) to write them")
        tensors, digest = load_per_example(path)
        if key not in tensors:
            raise ValueError(f"{path} holds no {key!r}; it holds {', '.join(sorted(tensors))}")
        values.append((path, tensors[key].double(), digest))
    (path_a, log_a, digest_a), (path_b, log_b, digest_b) = values
    if digest_a != digest_b or log_a.shape != log_b.shape:
        raise ValueError(f"{path_a} and {path_b} scored different examples: a paired difference needs the same ones")
    differences = log_b - log_a  # NLL_a - NLL_b per example
    n = differences.numel()
    if n < 2:
        raise ValueError(f"a paired difference needs at least 2 examples, got {n}")
    return PairedDifference(differences.mean().item(), differences.std().item() / math.sqrt(n), n)


@torch.no_grad()
def posterior_means(
    model: LatentVariableModel, x: Tensor, generator: torch.Generator, n_samples: int = 100
) -> list[Tensor]:
    """``E_q[h_j | x]`` per stochastic layer, each ``[batch, d_j]`` (Monte Carlo above layer 1)."""
    sample = model(x, n_samples, generator)
    means = [sample.q_params[0][0]]
    for mean, _ in sample.q_params[1:]:  # [n_samples, batch, d]
        means.append(mean.mean(dim=0))
    return means


@torch.no_grad()
def unit_kl(model: LatentVariableModel, x: Tensor, generator: torch.Generator) -> list[Tensor]:
    """Per-unit KL(q(h_j | .) || p(h_j | .)) for one sample of the other layers: ``[batch, d_j]`` each."""
    sample = model(x, 1, generator)
    kls = []
    top = len(sample.latents) - 1
    for j, (q_mean, q_log_std) in enumerate(sample.q_params):
        if j == 0:  # q(h_1 | x) has no sample dimension
            q_mean, q_log_std = q_mean.unsqueeze(0), q_log_std.unsqueeze(0)
        if j == top:
            p_mean, p_log_std = torch.zeros_like(q_mean), torch.zeros_like(q_log_std)
        else:
            p_mean, p_log_std = model.decoder[j + 1](sample.latents[j + 1])
        var_ratio = torch.exp(2 * (q_log_std - p_log_std))
        mean_term = ((q_mean - p_mean) * torch.exp(-p_log_std)) ** 2
        kls.append((0.5 * (var_ratio + mean_term - 1) - (q_log_std - p_log_std))[0])
    return kls


@torch.no_grad()
def activity(
    model: LatentVariableModel,
    split: Split,
    binarization: str,
    generator: torch.Generator,
    batch_size: int = 500,
) -> tuple[list[Tensor], list[Tensor]]:
    """Per layer: ``A_u`` (variance over the split of E_q[u | x]) and the mean per-unit KL, ``[d_j]`` each."""
    means: list[list[Tensor]] = []
    kl_sums: list[Tensor] = []
    for start in range(0, len(split), batch_size):
        x = binarize(split.images[start : start + batch_size], binarization, generator)
        for j, mean in enumerate(posterior_means(model, x, generator)):
            if len(means) <= j:
                means.append([])
            means[j].append(mean.double())
        for j, kl in enumerate(unit_kl(model, x, generator)):
            kl_sum = kl.double().sum(dim=0)
            if len(kl_sums) <= j:
                kl_sums.append(kl_sum)
            else:
                kl_sums[j] = kl_sums[j] + kl_sum
    variances = [torch.cat(layer).var(dim=0) for layer in means]
    mean_kls = [kl_sum / len(split) for kl_sum in kl_sums]
    return variances, mean_kls


def count_active(values: list[Tensor]) -> list[int]:
    """Units per layer with a value ``> 0.01`` (our definitions)."""
    return [int((v > ACTIVE_THRESHOLD).sum().item()) for v in values]


@torch.no_grad()
def authors_unit_variances(
    model: LatentVariableModel, images: Tensor, binarization: str, generator: torch.Generator
) -> list[Tensor]:
    """The authors' unit variances (yburda/iwae, iwae.py ``get_units_variances``), float64 ``[d_j]`` per layer.

    ``images`` ``[n, x_dim]`` (the authors': the first 500 training images) are binarised once; one sample is
    drawn from q for each image, layer by layer, and layer j's variance is that of q(h_j | h_{j-1})'s mean over
    the images, with h_{j-1} that one sample (x for the first layer): ``np.var``, the population variance
    (ddof = 0). The authors keep a unit whose variance is ``>= 0.01`` (:func:`authors_keep`).
    """
    x = binarize(images, binarization, generator)
    sample = model(x, 1, generator)
    means = [sample.q_params[0][0]] + [mean[0] for mean, _ in sample.q_params[1:]]  # [batch, d_j] each
    return [mean.double().var(dim=0, correction=0) for mean in means]


def count_kept(keep: list[Tensor]) -> list[int]:
    return [int(kept.sum().item()) for kept in keep]


def authors_keep(variances: list[Tensor]) -> list[Tensor]:
    """The units the authors keep (``chop_units_with_variance_under_threshold``): boolean ``[d_j]``, variance
    ``>= 0.01``."""
    return [v >= ACTIVE_THRESHOLD for v in variances]


@torch.no_grad()
def estimate_log_likelihood(
    model: Model,
    split: Split,
    binarization: str,
    k: int,
    generator: torch.Generator,
    *,
    batch_size: int = 100,
    max_rows: int = 5_000,
    unit_masks: list[Tensor] | None = None,
    pruned: Model | None = None,
    progress: bool = False,
) -> dict[str, Tensor]:
    """Per-example L_k, the k samples drawn in chunks of ``max_rows // batch_size`` (float64 log-mean-exp).

    Each example is binarised once. For Burda's models q(h_1 | x) is computed once per minibatch and passed to the
    chunks as ``first_q`` (the same numbers).

    Args:
        model: any model that follows :class:`iwae.protocol.Model`.
        split: the examples, ``[n, x_dim]``.
        binarization: how the examples are binarised (:func:`iwae.data.binarize`).
        k: samples per example.
        generator: the source of the binarisation and the samples.
        batch_size: examples per minibatch.
        max_rows: sample rows per chunk; the largest temporary is ``[max_rows, x_dim]`` float32 logits
            (16 MB for MNIST at the default), whatever k is.
        unit_masks: per layer, ``[d_j]`` float masks of the units kept (Burda's models only).
        pruned: a smaller model (say, :meth:`LatentVariableModel.without_units`), instead of ``unit_masks``.
        progress: show a progress bar.

    Returns:
        Float64 ``[n]`` tensors: ``log_lik`` (L_k), ``recon`` (mean of log p(x | h) over the k samples), ``kl``
        (mean of log q - log p(h)) and, with ``unit_masks`` or ``pruned``, ``log_lik_active``: L_k of the model
        with the masked units removed, or of ``pruned``, on the same binarised examples.
    """

    def is_burda(candidate: Model) -> bool:
        return isinstance(getattr(candidate, "_orig_mod", candidate), LatentVariableModel)  # _orig_mod: compiled

    burda = is_burda(model)
    if unit_masks is not None and not burda:
        raise ValueError("unit masks apply to iwae.models.LatentVariableModel only")
    if unit_masks is not None and pruned is not None:
        raise ValueError("give unit_masks or a pruned model, not both")
    pruned_burda = pruned is not None and is_burda(pruned)
    chunk = max(1, min(k, max_rows // batch_size))
    out: dict[str, list[Tensor]] = {"log_lik": [], "recon": [], "kl": []}
    if unit_masks is not None or pruned is not None:
        out["log_lik_active"] = []
    bar = tqdm(total=len(split), unit="example", desc=f"L_{k}", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(split), batch_size):
        x = binarize(split.images[start : start + batch_size], binarization, generator)
        full, without = LogMeanExpAccumulator(), LogMeanExpAccumulator()
        recon = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
        kl = torch.zeros_like(recon)
        # Burda's models: q(h_1 | x) once per minibatch, the same for every chunk of samples; other models are
        # called as iwae.protocol.Model says.
        extra = {"first_q": model.encoder[0](x)} if burda else {}
        pruned_extra = {"first_q": pruned.encoder[0](x)} if pruned_burda else {}
        for done in range(0, k, chunk):
            size = min(chunk, k - done)
            sample = model(x, size, generator, **extra)
            full.add(sample.log_w)
            recon += sample.log_px_given_h.double().sum(dim=0)
            kl += (sample.log_q - sample.log_prior).double().sum(dim=0)
            if unit_masks is not None:
                without.add(model(x, size, generator, unit_masks=unit_masks, **extra).log_w)
            elif pruned is not None:
                without.add(pruned(x, size, generator, **pruned_extra).log_w)
        out["log_lik"].append(full.result())
        out["recon"].append(recon / k)
        out["kl"].append(kl / k)
        if "log_lik_active" in out:
            out["log_lik_active"].append(without.result())
        bar.update(x.shape[0])
    bar.close()
    return {name: torch.cat(values).cpu() for name, values in out.items()}


def evaluate_model(
    model: LatentVariableModel,
    split: Split,
    binarization: str,
    *,
    k: int = 5000,
    seed: int = 0,
    split_name: str = "test",
    authors_split: Split | None = None,
    prune_inactive: bool = True,
    units: str = "ours",
    batch_size: int = 100,
    progress: bool = False,
    compile_model: bool = False,
    accelerate: Callable[[nn.Module], nn.Module] | None = None,
    max_rows: int | None = None,
) -> EvalResult:
    """NLL = -mean L_k over ``split``, active units, and the reconstruction and KL terms.

    Args:
        model: the model to evaluate.
        split: the examples, ``[n, x_dim]``, at least 2.
        binarization: how the examples are binarised (:func:`iwae.data.binarize`). ``"dynamic"``: each example is
            one Bernoulli draw, made before anything else with the seeded generator, so every model and every
            ``k`` evaluated with one seed sees the same binary images, and the active units, the terms and L_k see
            them too.
        k: samples per example of L_k.
        seed: seeds the binarisation and the samples.
        split_name: the split's name, for the result.
        authors_split: the run's training images; the authors' active units (``active_units_authors``) come from
            its first 500 (:func:`authors_unit_variances`, with a generator of their own seeded ``seed``, so they
            do not move the L_k draws). None leaves them out.
        prune_inactive: also compute the pruned NLL (``nll_active_only``).
        units: whose inactive units the pruned NLL leaves out: ``"ours"`` masks the units with ``A_u <= 0.01``
            over ``split``; ``"authors"`` (needs ``authors_split``) cuts the units with an authors' variance under
            0.01 out of the weights (:meth:`LatentVariableModel.without_units`). A layer the authors' variances
            would empty is masked instead (a :class:`~iwae.models.ModelConfig` has no empty layer).
        batch_size: examples per minibatch of L_k.
        progress: show a progress bar.
        compile_model: draw the L_k samples through ``torch.compile(model)`` (the noise still comes eagerly from
            the seeded generator; the same results up to rounding). For GPUs: on a CPU where the fast paths run,
            eager is faster (docs/performance.md#switching-the-fast-paths-off-and-compile).
        accelerate: returns the model to draw the L_k samples from, computing the same values faster (``iwae
            eval`` passes :func:`iwae.fast.for_evaluation`); None draws them from ``model`` itself.
        max_rows: sample rows per chunk of L_k (default :func:`chunk_rows` of the model's device).

    Returns:
        The :class:`EvalResult`.
    """
    if len(split) < 2:
        raise ValueError(f"evaluation needs at least 2 examples (active units are a variance), got {len(split)}")
    if units not in UNIT_DEFINITIONS:
        raise ValueError(f"units must be one of {', '.join(UNIT_DEFINITIONS)}, got {units!r}")
    if units == "authors" and authors_split is None:
        raise ValueError("units='authors' needs authors_split, the run's training images")
    started = time.perf_counter()
    device = next(model.parameters()).device
    split = split.to(device)
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    if binarization == "dynamic":  # the images first: the same draw whatever the model and k draw after it
        split, binarization = Split(binarize(split.images, binarization, generator), split.labels), "fixed"
    images_sha256 = examples_digest(split.images, binarization)
    variances, mean_kls = activity(model, split, binarization, generator)
    authors_variances: list[Tensor] = []
    if authors_split is not None:
        images = authors_split.subset(AUTHORS_IMAGES).images.to(device)
        own = torch.Generator(device=device).manual_seed(seed)
        authors_variances = authors_unit_variances(model, images, binarization, own)
    keep = authors_keep(authors_variances) if units == "authors" else [v > ACTIVE_THRESHOLD for v in variances]
    unit_masks, pruned = None, None
    if prune_inactive and not all(bool(kept.all()) for kept in keep):
        if units == "authors" and all(bool(kept.any()) for kept in keep):
            pruned = model.without_units(keep)
        else:
            unit_masks = [kept.to(torch.float32).to(device) for kept in keep]

    def sampler_of(candidate: LatentVariableModel) -> nn.Module:
        fast = accelerate(candidate) if accelerate is not None else candidate
        return torch.compile(fast) if compile_model else fast

    estimates = estimate_log_likelihood(
        sampler_of(model),
        split,
        binarization,
        k,
        generator,
        batch_size=batch_size,
        max_rows=chunk_rows(device) if max_rows is None else max_rows,
        unit_masks=unit_masks,
        pruned=None if pruned is None else sampler_of(pruned),
        progress=progress,
    )
    log_lik = estimates["log_lik"]
    n = log_lik.shape[0]
    if "log_lik_active" in estimates:
        nll_active: float | None = -estimates["log_lik_active"].mean().item()
    else:
        nll_active = -log_lik.mean().item() if prune_inactive else None
    recon, kl = estimates["recon"].mean().item(), estimates["kl"].mean().item()
    return EvalResult(
        nll=-log_lik.mean().item(),
        nll_std_err=log_lik.std().item() / math.sqrt(n),
        k=k,
        split=split_name,
        n_examples=n,
        seed=seed,
        active_units=count_active(variances),
        active_units_authors=None if authors_split is None else count_kept(authors_keep(authors_variances)),
        active_units_kl=count_active(mean_kls),
        nll_active_only=nll_active,
        recon_log_lik=recon,
        kl=kl,
        elbo=recon - kl,
        seconds=time.perf_counter() - started,
        log_activity=[torch.log(v.clamp_min(1e-300)).tolist() for v in variances],
        pruned_by=units,
        log_activity_authors=[torch.log(v.clamp_min(1e-300)).tolist() for v in authors_variances],
        images_sha256=images_sha256,
        per_example={name: estimates[name] for name in ("log_lik", "log_lik_active") if name in estimates},
    )


def evaluate_run(
    run_dir: str | Path,
    *,
    k: int = 5000,
    split: str = "test",
    limit: int | None = None,
    seed: int = 0,
    device: str = "auto",
    data_dir: str | None = None,
    prune_inactive: bool = True,
    units: str = "ours",
    batch_size: int = 100,
    progress: bool = True,
    compile_model: bool = False,
    accelerate: Callable[[nn.Module], nn.Module] | None = None,
    dataset: Dataset | None = None,
    extra: Mapping[str, Any] | None = None,
    binarization: str | None = None,
) -> EvalResult:
    """Evaluate a run directory's model and write the result to ``eval.json`` and :func:`eval_file_name` in it.

    The data are the run's: its binarisation and its training split (:func:`iwae.data.for_run`), so the authors'
    active units come from the first 500 images the run trained on; ``binarization`` evaluates on grey-level images
    binarised otherwise than the run was trained (``dynamic``: one draw with ``seed``; ``threshold``), and the
    files written then name it (``eval-test-k5000-seed0-threshold.json``) and record it (``binarization``). The
    authors' protocol is ``units="authors", batch_size=20``. The other arguments are :func:`evaluate_model`'s.

    Args:
        run_dir: the run directory; must be writable.
        limit: only the first ``limit`` examples of the split.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ...
        dataset: the run's dataset already loaded (None loads it, from ``data_dir``).
        extra: more fields for the files written, after the result's (the lab records its evaluation settings
            there, ``eval_settings``).
        binarization: None (the run's own), ``dynamic`` or ``threshold``; another than the run's own needs the
            grey-level dataset (``dataset`` as loaded, or None).

    Raises:
        RunError: the model cannot be loaded or is non-finite (nothing is written), or ``run_dir`` is not
            writable.
    """
    if units not in UNIT_DEFINITIONS:  # refused before the model and the data are loaded
        raise ValueError(f"units must be one of {', '.join(UNIT_DEFINITIONS)}, got {units!r}")
    if binarization not in (None, *BINARIZATIONS):
        raise ValueError(f"binarization must be one of {', '.join(BINARIZATIONS)}, got {binarization!r}")
    run_dir = Path(run_dir)
    torch_device = resolve_device(device)
    model, config = load_model(run_dir, torch_device)
    if not os.access(run_dir, os.W_OK | os.X_OK):  # refused now, not after the evaluation
        raise RunError(f"{run_dir} is not writable, and eval writes its results there; make it writable")
    if dataset is None:
        dataset = load_dataset(config.dataset, data_dir, progress=progress)
    own = config.binarization or dataset.binarization  # the run's own binarisation, as for_run reads it
    other = binarization if binarization not in (None, own) else None
    data = for_run(dataset, other or config.binarization, config.train_split)
    result = evaluate_model(
        model,
        data.split(split).subset(limit),
        data.binarization,
        k=k,
        seed=seed,
        split_name=split,
        authors_split=data.train,
        prune_inactive=prune_inactive,
        units=units,
        batch_size=batch_size,
        progress=progress,
        compile_model=compile_model,
        accelerate=accelerate,
    )
    nlls = [result.nll] if result.nll_active_only is None else [result.nll, result.nll_active_only]
    if not all(math.isfinite(nll) for nll in nlls):
        raise RunError(f"{run_dir}: the model's NLL is non-finite ({result.nll}): the run diverged; nothing written")
    payload = result.to_dict()
    payload["limit"] = limit
    payload["dataset"] = config.dataset
    if other is not None:
        payload["binarization"] = other
    named = run_dir / eval_file_name(split, k, seed, limit, units, other)
    payload["per_example_file"] = per_example_file(named).name
    payload.update(extra or {})
    text = json.dumps(payload, indent=2, allow_nan=False) + "\n"
    save_per_example(per_example_file(named), result.per_example, result.images_sha256)  # before the JSON naming it
    atomic_write_text(named, text)
    atomic_write_text(run_dir / EVAL_FILE, text)
    return result


def eval_file_name(
    split: str, k: int, seed: int, limit: int | None, units: str = "ours", binarization: str | None = None
) -> str:
    """The file of one evaluation's settings, ``eval-<split>-k<K>-seed<S>[-limit<N>][-authors][-<binarization>].json``
    (``-authors``: the pruned NLL by the authors' units; ``binarization``: images binarised otherwise than the run
    trained on, None for its own)."""
    name = f"eval-{split}-k{k}-seed{seed}" + (f"-limit{limit}" if limit is not None else "")
    return name + ("-authors" if units == "authors" else "") + (f"-{binarization}" if binarization else "") + ".json"
