"""iwae.evaluate: active units (ours, and the authors' unit variances as their code computes them), the pruned
model, L_k streaming and eval output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from iwae import bounds, evaluate
from iwae.checkpoint import CheckpointError, load_per_example, save_model, save_per_example
from iwae.config import TrainConfig
from iwae.data import Split, binarize, for_run, load_dataset
from iwae.evaluate import (
    ACTIVE_THRESHOLD,
    activity,
    authors_keep,
    authors_unit_variances,
    count_active,
    estimate_log_likelihood,
    evaluate_model,
    evaluate_run,
    examples_digest,
    paired_nll_difference,
    per_example_file,
)
from iwae.models import LatentVariableModel, ModelConfig
from iwae.runs import CONFIG_FILE, EVAL_FILE, MODEL_FILE


def _model_with_dead_units(dead: int = 10) -> LatentVariableModel:
    torch.manual_seed(0)
    model = LatentVariableModel(ModelConfig(x_dim=784, latent_dims=(20,), hidden_dims=((50,),)))
    with torch.no_grad():
        head = model.encoder[0].head
        head.weight[:20] *= 10  # strongly input-dependent means...
        head.weight[:dead] = 0  # ...except for the first `dead` units, whose mean is constant
    return model


def test_active_units_counts_input_dependent_means(mnist) -> None:
    model = _model_with_dead_units(10)
    split = mnist.test.subset(300)
    variances, kls = activity(model, split, "dynamic", torch.Generator().manual_seed(0))
    assert count_active(variances) == [10]
    assert torch.all(variances[0][:10] < 1e-12)
    assert variances[0].shape == (20,) and kls[0].shape == (20,)


def test_pruned_model_and_result_fields(mnist) -> None:
    model = _model_with_dead_units(10)
    result = evaluate_model(model, mnist.test.subset(40), "dynamic", k=64, authors_split=mnist.train)
    assert result.active_units == [10] and result.active_units_authors == [10]
    assert result.n_examples == 40 and result.k == 64
    assert result.nll > 0 and result.nll_active_only is not None
    assert abs(result.nll_active_only - result.nll) < 5 * result.nll_std_err
    assert result.elbo == pytest.approx(result.recon_log_lik - result.kl)
    assert -result.nll >= result.elbo - 1e-6  # L_64 >= ELBO on the same samples' average
    assert len(result.log_activity) == 1 and len(result.log_activity[0]) == 20


@pytest.mark.parametrize("layers", [1, 2])
def test_streamed_estimate_equals_one_shot_logsumexp_of_the_same_samples(mnist, layers: int) -> None:
    torch.manual_seed(1)
    model = LatentVariableModel(ModelConfig.burda(layers))
    split, k, batch, max_rows = mnist.test.subset(12), 50, 6, 42  # chunks of 7 samples, the last one of 1
    streamed = estimate_log_likelihood(
        model, split, "dynamic", k, torch.Generator().manual_seed(0), batch_size=batch, max_rows=max_rows
    )
    generator = torch.Generator().manual_seed(0)
    expected = []
    with torch.no_grad():
        for start in range(0, len(split), batch):
            x = binarize(split.images[start : start + batch], "dynamic", generator)
            log_w = torch.cat([model(x, min(7, k - done), generator).log_w for done in range(0, k, 7)])
            expected.append(bounds.iwae_bound(log_w.double()))
    assert streamed["log_lik"].dtype == torch.float64
    torch.testing.assert_close(streamed["log_lik"], torch.cat(expected), rtol=1e-6, atol=1e-4)
    assert (streamed["log_lik"] >= streamed["recon"] - streamed["kl"] - 1e-6).all()


def test_removing_units_that_equal_the_prior_and_feed_nothing_leaves_log_weights_unchanged(mnist) -> None:
    model = _model_with_dead_units(10)
    with torch.no_grad():
        model.encoder[0].head.weight[20:30] = 0  # their std is exp(0) = 1: q equals the prior N(0, 1)
        model.decoder[0].hidden[0].weight[:, :10] = 0  # and they no longer reach the decoder
    x = mnist.test.images[:5]
    mask = torch.cat([torch.zeros(10), torch.ones(10)])
    pruned = model(x, 16, torch.Generator().manual_seed(0), unit_masks=[mask])
    full = model(x, 16, torch.Generator().manual_seed(0))
    torch.testing.assert_close(pruned.log_w, full.log_w, rtol=1e-5, atol=1e-3)


@pytest.mark.slow
def test_compiled_evaluation_matches_eager(mnist) -> None:
    """``--compile`` draws the same noise from the same generator: the same NLL up to rounding."""
    model = _model_with_dead_units(10)
    split = mnist.test.subset(6)
    eager = evaluate_model(model, split, "dynamic", k=40, batch_size=3, prune_inactive=False)
    compiled = evaluate_model(model, split, "dynamic", k=40, batch_size=3, prune_inactive=False, compile_model=True)
    assert compiled.nll == pytest.approx(eager.nll, abs=1e-3)
    assert compiled.active_units == eager.active_units and compiled.kl == pytest.approx(eager.kl, abs=1e-3)


# -- whose units the pruned NLL leaves out --------------------------------------------------------------------------
def _linear_encoder_model() -> LatentVariableModel:
    """No hidden layers: unit u's mean is W_u . x. Units 0-4 read the image's top half, units 5-9 its bottom half."""
    torch.manual_seed(0)
    model = LatentVariableModel(ModelConfig(x_dim=784, latent_dims=(10,), hidden_dims=((),)))
    with torch.no_grad():
        weight = model.encoder[0].head.weight  # [mean rows; log-std rows] x 784
        weight[:10] = 0.2 * torch.randn(10, 784)
        weight[:5, 392:] = 0
        weight[5:10, :392] = 0
        weight[10:] = 0
    return model


def test_units_authors_cuts_the_units_the_authors_variances_drop(mnist) -> None:
    model, split = _linear_encoder_model(), mnist.test.subset(12)
    train = mnist.train.subset(500)
    blank_top = Split(torch.cat([torch.zeros(500, 392), train.images[:, 392:]], dim=1))  # units 0-4 constant here
    options = {"k": 16, "batch_size": 6, "seed": 3, "authors_split": blank_top}
    ours = evaluate_model(model, split, "threshold", **options)
    authors = evaluate_model(model, split, "threshold", units="authors", **options)
    assert ours.pruned_by == "ours" and authors.pruned_by == "authors"
    assert ours.active_units == authors.active_units == [10]  # the test images: every unit varies
    assert ours.active_units_authors == authors.active_units_authors == [5]  # the authors' images: 5 are constant
    assert ours.nll_active_only == ours.nll  # nothing to prune by our definition
    assert abs(authors.nll_active_only - authors.nll) > 1  # the 5 cut units mattered

    generator = torch.Generator().manual_seed(3)  # by hand: our activity's draws, then L_k of the cut model
    activity(model, split, "threshold", generator)
    variances = authors_unit_variances(model, blank_top.images, "threshold", torch.Generator().manual_seed(3))
    keep = authors_keep(variances)
    assert keep[0].tolist() == [False] * 5 + [True] * 5
    smaller = model.without_units(keep)
    assert smaller.config.latent_dims == (5,)
    expected = estimate_log_likelihood(model, split, "threshold", 16, generator, batch_size=6, pruned=smaller)
    assert authors.nll_active_only == pytest.approx(-expected["log_lik_active"].mean().item(), abs=1e-9)
    assert authors.nll == pytest.approx(-expected["log_lik"].mean().item(), abs=1e-9)
    assert len(authors.log_activity_authors[0]) == 10
    torch.testing.assert_close(
        torch.tensor(authors.log_activity_authors[0], dtype=torch.float64), variances[0].clamp_min(1e-300).log()
    )


def test_units_authors_masks_a_layer_it_would_empty(mnist) -> None:
    """Every unit constant on the authors' images: no model has an empty layer, so the units are masked, which
    leaves log p(x | h_1 = 0), the same for every sample."""
    model, split = _linear_encoder_model(), mnist.test.subset(6)
    same_image = Split(mnist.train.images[:1].repeat(500, 1))
    result = evaluate_model(model, split, "threshold", k=8, authors_split=same_image, units="authors")
    assert result.active_units_authors == [0] and result.pruned_by == "authors"
    x = binarize(split.images, "threshold")
    with torch.no_grad():
        expected = -model.observation_log_prob(x, torch.zeros(1, 6, 10)).mean().item()
    assert result.nll_active_only == pytest.approx(expected, abs=1e-4)


def test_units_must_be_ours_or_authors_and_authors_needs_the_training_images(mnist) -> None:
    model, split = _linear_encoder_model(), mnist.test.subset(4)
    with pytest.raises(ValueError, match="units must be one of ours, authors"):
        evaluate_model(model, split, "threshold", k=2, units="theirs")
    with pytest.raises(ValueError, match="needs authors_split"):
        evaluate_model(model, split, "threshold", k=2, units="authors")


def test_evaluate_run_uses_the_runs_binarisation_and_training_split(tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    run.mkdir()
    model = _linear_encoder_model()
    config = TrainConfig(model=model.config, binarization="threshold", train_split="train+valid")
    (run / CONFIG_FILE).write_text(config.to_json())
    save_model(run / MODEL_FILE, model, config.to_json())
    seen = {}

    def spy(*args, **kwargs):
        seen.update(binarization=args[2], train=len(kwargs["authors_split"]), batch_size=kwargs["batch_size"])
        return evaluate_model(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_model", spy)
    result = evaluate_run(run, k=3, limit=4, units="authors", batch_size=20, device="cpu", progress=False)
    assert seen == {"binarization": "threshold", "train": 60_000, "batch_size": 20}
    saved = json.loads((run / "eval-test-k3-seed0-limit4-authors.json").read_text())
    assert saved["pruned_by"] == "authors" and json.loads((run / EVAL_FILE).read_text()) == saved
    assert saved["active_units_authors"] == result.active_units_authors
    data = load_dataset("mnist", progress=False)  # the authors' variances: the first 500 images, thresholded
    variances = authors_unit_variances(model, data.train.images[:500], "threshold", torch.Generator())
    torch.testing.assert_close(
        torch.tensor(saved["log_activity_authors"][0], dtype=torch.float64), variances[0].clamp_min(1e-300).log()
    )
    seen.clear()  # the run's dataset as the lab hands it over, train+valid already
    evaluate_run(run, k=3, limit=4, device="cpu", progress=False, dataset=for_run(data, "threshold", "train+valid"))
    assert seen == {"binarization": "threshold", "train": 60_000, "batch_size": 100}


def test_evaluate_run_on_images_binarised_otherwise(tmp_path: Path, monkeypatch) -> None:
    """``binarization``: the same images binarised otherwise than the run trained, named in the file and recorded;
    the run's own binarisation is the plain evaluation; a name that is none is refused before anything is read."""
    run = tmp_path / "run"
    run.mkdir()
    model = _linear_encoder_model()
    config = TrainConfig(model=model.config, binarization="threshold")
    (run / CONFIG_FILE).write_text(config.to_json())
    save_model(run / MODEL_FILE, model, config.to_json())
    seen = []

    def spy(*args, **kwargs):
        seen.append(args[2])
        return evaluate_model(*args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_model", spy)
    crossed = evaluate_run(run, k=3, limit=4, device="cpu", progress=False, binarization="dynamic")
    saved = json.loads((run / "eval-test-k3-seed0-limit4-dynamic.json").read_text())
    assert saved["binarization"] == "dynamic" and saved["nll"] == crossed.nll
    evaluate_run(run, k=3, limit=4, device="cpu", progress=False, binarization="threshold")  # its own
    assert "binarization" not in json.loads((run / "eval-test-k3-seed0-limit4.json").read_text())
    assert seen == ["dynamic", "threshold"]
    with pytest.raises(ValueError, match="binarization must be one of dynamic, threshold"):
        evaluate_run(run, k=3, device="cpu", progress=False, binarization="fixed")
    assert sorted(p.name for p in run.glob("eval*.json")) == [
        "eval-test-k3-seed0-limit4-dynamic.json",
        "eval-test-k3-seed0-limit4.json",
        "eval.json",
    ]


def _run_folder(path: Path, model: LatentVariableModel) -> Path:
    path.mkdir()
    config = TrainConfig(model=model.config)
    (path / CONFIG_FILE).write_text(config.to_json())
    save_model(path / MODEL_FILE, model, config.to_json())
    return path


def test_evaluate_run_keeps_each_examples_bound_for_paired_differences(tmp_path: Path, mnist) -> None:
    """Beside each named evaluation file, L_k of every example and the pruned L_k, with the digest of the binary
    images, which the JSON records too; two models on the same images give the paired difference of their NLLs,
    whose mean is the difference of the NLLs; another seed's images are refused."""
    dead = _run_folder(tmp_path / "dead", _model_with_dead_units(10))
    linear = _run_folder(tmp_path / "linear", _linear_encoder_model())
    results = {}
    for run in (dead, linear):
        results[run.name] = evaluate_run(run, k=4, limit=30, device="cpu", progress=False, dataset=mnist)
        saved = json.loads((run / "eval-test-k4-seed0-limit30.json").read_text())
        assert saved["per_example_file"] == "eval-test-k4-seed0-limit30.per-example.safetensors"
        assert json.loads((run / EVAL_FILE).read_text()) == saved
        values, digest = load_per_example(run / saved["per_example_file"])
        assert digest == saved["images_sha256"] == results[run.name].images_sha256
        assert values["log_lik"].dtype == torch.float64 and values["log_lik"].shape == (30,)
        assert -values["log_lik"].mean().item() == pytest.approx(saved["nll"], rel=1e-12)
        assert sorted(values) == (["log_lik", "log_lik_active"] if run is dead else ["log_lik"])
        assert -values.get("log_lik_active", values["log_lik"]).mean().item() == pytest.approx(
            saved["nll_active_only"], rel=1e-12
        )
    assert results["dead"].images_sha256 == results["linear"].images_sha256  # one seed: the same images
    pair = paired_nll_difference(dead / "eval-test-k4-seed0-limit30.json", linear / "eval-test-k4-seed0-limit30.json")
    assert pair.n_examples == 30
    assert pair.difference == pytest.approx(results["dead"].nll - results["linear"].nll, abs=1e-9)
    evaluate_run(linear, k=4, limit=30, seed=1, device="cpu", progress=False, dataset=mnist)
    with pytest.raises(ValueError, match="scored different examples"):
        paired_nll_difference(dead / "eval-test-k4-seed0-limit30.json", linear / "eval-test-k4-seed1-limit30.json")
    with pytest.raises(ValueError, match="evaluate the run again"):
        paired_nll_difference(dead / "eval-test-k4-seed0-limit30.json", linear / "eval-test-k9-seed0.json")


def test_paired_difference_is_the_mean_and_standard_error_of_the_per_example_differences(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    shared = torch.randn(500, generator=generator, dtype=torch.float64) * 30 - 90  # what both models find hard
    a = shared + torch.randn(500, generator=generator, dtype=torch.float64)
    b = shared + 0.5 + torch.randn(500, generator=generator, dtype=torch.float64)
    paths = [tmp_path / f"{name}{evaluate.PER_EXAMPLE_SUFFIX}" for name in "ab"]
    for path, values in zip(paths, (a, b), strict=True):
        save_per_example(path, {"log_lik": values}, "sha256:same")
    pair = paired_nll_difference(*paths)
    differences = (b - a).numpy()  # NLL_a - NLL_b, example by example
    assert pair.difference == pytest.approx(differences.mean(), abs=1e-12)
    assert pair.std_err == pytest.approx(differences.std(ddof=1) / np.sqrt(500), rel=1e-12)
    assert pair.std_err < 0.1 < a.std().item() / np.sqrt(500)  # the shared part cancels; each NLL's own se is ~1.3


def test_per_example_files_are_checked_on_load(tmp_path: Path) -> None:
    path = tmp_path / "x.per-example.safetensors"
    save_per_example(path, {"log_lik": torch.zeros(3, dtype=torch.float64)}, "sha256:abc")
    assert load_per_example(path)[1] == "sha256:abc"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF  # a flipped bit in the values
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"fail the checksum.*evaluate the run again"):
        load_per_example(path)
    model_file = tmp_path / "model.safetensors"
    save_model(model_file, torch.nn.Linear(2, 2), "{}")
    with pytest.raises(CheckpointError, match="not an evaluation's per-example file"):
        load_per_example(model_file)
    assert per_example_file("/r/eval-test-k5000-seed0.json") == Path("/r/eval-test-k5000-seed0.per-example.safetensors")


def test_examples_digest_names_the_binary_images() -> None:
    images = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert examples_digest(images, "fixed") == examples_digest(images.clone(), "fixed")
    flipped = images.clone()
    flipped[1, 2] = 1.0
    assert examples_digest(flipped, "fixed") != examples_digest(images, "fixed")
    assert examples_digest(images, "threshold") != examples_digest(images, "fixed")
    assert examples_digest(images[:1], "fixed") != examples_digest(images, "fixed")


def test_a_dynamic_evaluation_sees_one_draw_of_the_images_whatever_the_model_and_k(mnist, monkeypatch) -> None:
    """The images are drawn first from the seeded generator: the same binary images for the active units and L_k,
    for every k and for models that draw different amounts of noise; another seed draws other images."""
    split = mnist.test.subset(6)
    seen: list[tuple[str, torch.Tensor]] = []
    real_activity, real_estimate = evaluate.activity, evaluate.estimate_log_likelihood

    def spy_activity(model, images, binarization, generator, **kwargs):
        seen.append((binarization, images.images.clone()))
        return real_activity(model, images, binarization, generator, **kwargs)

    def spy_estimate(model, images, binarization, k, generator, **kwargs):
        seen.append((binarization, images.images.clone()))
        return real_estimate(model, images, binarization, k, generator, **kwargs)

    monkeypatch.setattr(evaluate, "activity", spy_activity)
    monkeypatch.setattr(evaluate, "estimate_log_likelihood", spy_estimate)
    torch.manual_seed(0)
    small = LatentVariableModel(ModelConfig(latent_dims=(3,), hidden_dims=((8, 8),)))
    large = LatentVariableModel(ModelConfig(latent_dims=(7, 2), hidden_dims=((16, 16), (4, 4))))
    for model, k in ((small, 1), (small, 9), (large, 4)):
        evaluate_model(model, split, "dynamic", k=k, seed=3, prune_inactive=False)
    assert {binarization for binarization, _ in seen} == {"fixed"}  # binarised once, before
    first = seen[0][1]
    assert set(first.unique().tolist()) == {0.0, 1.0}
    assert all(torch.equal(images, first) for _, images in seen)
    assert torch.equal(first, binarize(split.images, "dynamic", torch.Generator().manual_seed(3)))
    evaluate_model(small, split, "dynamic", k=1, seed=4, prune_inactive=False)
    assert not torch.equal(seen[-1][1], first)


def test_authors_unit_variances_follow_their_code(mnist) -> None:
    """yburda/iwae get_units_variances: x binarised once, one sample of h1 feeds layer 2, np.var (ddof = 0)."""
    torch.manual_seed(0)
    model = LatentVariableModel(ModelConfig(x_dim=784, latent_dims=(8, 4), hidden_dims=((20,), (10,))))
    with torch.no_grad():
        model.encoder[0].head.weight.mul_(5)
        model.encoder[1].head.weight.mul_(5)
    images = mnist.train.images[:500]
    variances = authors_unit_variances(model, images, "dynamic", torch.Generator().manual_seed(7))

    generator = torch.Generator().manual_seed(7)  # the same draws, by hand: binarise, then one noise per layer
    x = binarize(images, "dynamic", generator)
    eps1 = torch.randn((1, 500, 8), generator=generator)[0]
    with torch.no_grad():
        mean1, log_std1 = model.encoder[0](x)
        mean2, _ = model.encoder[1](mean1 + torch.exp(log_std1) * eps1)
    expected = [np.var(mean.numpy().astype(np.float64), axis=0) for mean in (mean1, mean2)]
    assert [v.dtype for v in variances] == [torch.float64, torch.float64]
    for ours, theirs in zip(variances, expected, strict=True):
        np.testing.assert_allclose(ours.numpy(), theirs, rtol=1e-6, atol=1e-12)
        assert not np.allclose(ours.numpy(), theirs * 500 / 499, rtol=1e-4, atol=0)  # ddof = 0, not 1
    # Not our definition: layer 2's mean averaged over 100 samples of h1 varies less than one sample's.
    split = type(mnist.train)(images)
    monte_carlo, _ = activity(model, split, "dynamic", torch.Generator().manual_seed(7))
    assert monte_carlo[1].sum() < variances[1].sum()
    kept = authors_keep(variances)
    assert [bool(k.eq(v >= ACTIVE_THRESHOLD).all()) for k, v in zip(kept, variances, strict=True)] == [True, True]
    assert authors_keep([torch.tensor([0.0099, 0.01, 0.02], dtype=torch.float64)])[0].tolist() == [False, True, True]
