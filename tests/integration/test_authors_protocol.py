"""The authors' protocol end to end. Their training step as an oracle: Burda et al.'s Theano code (github
yburda/iwae) redone in NumPy float64 (tests/authors_oracle.py, which says what it redoes), against our side,
``protocol = "authors"`` (BurdaAdam, summed loss) through :func:`iwae.steps.training_step`, fed the same
initial parameters, the same binarised MNIST minibatches and the same noise. The trajectories must agree for
20 steps, on Burda's architectures (one layer 784-200-200-50, two layers 784-200-200-100-100-100-50). Then the
command line: training and evaluating as the authors did, and the table2 and student smoke presets.

The protocol's items are tested where they live: the configuration (tests/test_config.py), the data order,
continuation and resumption (tests/test_train.py), the threshold binarisation and the training split
(tests/test_data.py), the summed loss (tests/test_steps.py), BurdaAdam (tests/test_optim.py), stacks
(tests/test_stacked.py) and the flags (tests/cli/test_run.py, tests/cli/test_sweep.py).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from authors_oracle import AuthorsAdam, authors_gradient, authors_log_weights

from iwae import cli, runs, steps, train
from iwae.checkpoint import load_checkpoint
from iwae.config import build_train_config
from iwae.data import DataError, load_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, BATCH, LR = 20, 20, 1e-3
CASES = [(1, "iwae", 5), (1, "vae", 1), (1, "vae", 5), (2, "iwae", 5), (2, "vae", 1), (2, "vae", 5)]
# float64: both paths agree with the oracle to ~1e-15 after 20 steps (measured: 5.6e-17 .. 8.9e-16) while the
# parameters move by ~1.2e-2 .. 1.6e-2. 1e-9 leaves room for another BLAS's summation order, and still catches a
# change as small as Adam's epsilon (1e-4 against 1e-8 moves the trajectory by ~1e-6), which 1e-5 would not.
FLOAT64_TOLERANCE = 1e-9
# float32 (the C++ step) against the float64 oracle: the largest differences sit on the output biases (up to ~7 in
# size, where a float32 ulp is 4.8e-7), a few ulps after 20 steps: measured 1.7e-6 (one layer, IWAE k=5) and
# 2.2e-6 (two layers, VAE k=1). 2e-5 is ~10 times that and ~500 times below the parameters' movement.
FLOAT32_TOLERANCE = 2e-5


def authors_parameters(model) -> dict[str, np.ndarray]:
    """Our model's parameters as the oracle's: ``[in, out]`` weights, the Gaussian heads split into mean and sigma
    layers, ``decoder[j]`` as the authors' ``p_layers[L - 1 - j]``."""

    def array(tensor):
        return tensor.detach().to(torch.float64).numpy().copy()

    params = {}

    def put(prefix, head, gaussian):
        for i, layer in enumerate(head.hidden):
            params[f"{prefix}.h{i}.W"], params[f"{prefix}.h{i}.b"] = array(layer.weight).T, array(layer.bias)
        weight, bias = array(head.head.weight), array(head.head.bias)
        if gaussian:  # our head's rows: [mean; log_std]
            d = head.out_dim
            params[f"{prefix}.mean.W"], params[f"{prefix}.mean.b"] = weight[:d].T, bias[:d]
            params[f"{prefix}.sigma.W"], params[f"{prefix}.sigma.b"] = weight[d:].T, bias[d:]
        else:
            params[f"{prefix}.mean.W"], params[f"{prefix}.mean.b"] = weight.T, bias

    n_layers = len(model.encoder)
    for j in range(n_layers):
        put(f"q{j}", model.encoder[j], True)
        put(f"p{n_layers - 1 - j}", model.decoder[j], j > 0)
    return {name: np.ascontiguousarray(value) for name, value in params.items()}


def authors_noise(noise: list[torch.Tensor]) -> list[np.ndarray]:
    """Our noise ``[k, batch, d]`` in the rows of the authors' repeated minibatch: row ``b * k + i`` is sample i of
    example b."""
    return [e.detach().to(torch.float64).numpy().transpose(1, 0, 2).reshape(-1, e.shape[-1]).copy() for e in noise]


def max_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> tuple[float, str]:
    assert a.keys() == b.keys()
    worst = max(a, key=lambda name: np.abs(a[name] - b[name]).max())
    return float(np.abs(a[worst] - b[worst]).max()), worst


@pytest.fixture(scope="module")
def minibatches():
    """The first 400 MNIST training images (grey levels, for the output bias) and 20 binarised minibatches of 20,
    in the data's order (the authors' fixed order)."""
    try:
        data = load_dataset("mnist", download=False, progress=False)
    except DataError as error:
        pytest.skip(f"MNIST is not here: {error}")
    images = data.train.images[: STEPS * BATCH].to(torch.float64)
    binary = torch.bernoulli(images, generator=torch.Generator().manual_seed(1))
    return images, [binary[i * BATCH : (i + 1) * BATCH] for i in range(STEPS)]


def run_both(layers, objective, k, dtype, minibatches, fast):
    """20 authors' steps on our side and in the oracle from the same start with the same data and noise.

    Returns (path description, our parameters after each step, the oracle's, our reported bounds, the oracle's
    log-weights), the parameters in the oracle's layout, index 0 the initial ones."""
    images, batches = minibatches
    config = build_train_config(
        {"protocol": "authors", "layers": layers, "objective": objective, "k": k, "epochs": 1, "lr": LR}
    )
    assert (config.optimizer, config.beta1, config.beta2, config.adam_eps) == ("burda-adam", 0.99, 0.999, 1e-4)
    assert (config.loss_reduction, config.data_order, config.batch_size) == ("sum", "fixed", BATCH)
    model = train.build_model(config, images.float(), torch.device("cpu")).to(dtype)
    optimizer = steps.build_optimizer(model, config)
    path = steps.choose_step_path(model, config, fast=fast)
    generator = torch.Generator().manual_seed(7)

    ours = [authors_parameters(model)]
    oracle = [ours[0]]
    adam = AuthorsAdam(oracle[0], LR)
    bounds, oracle_log_ws = [], []
    for x in batches:
        x = x.to(dtype)
        twin = torch.Generator().set_state(generator.get_state())
        eps = authors_noise(model.draw_noise(x, k, twin))
        steps.clear_gradients(optimizer)
        bounds.append(steps.training_step(model, x, config, generator, path).detach().double().numpy())
        steps.optimizer_step(optimizer, path)
        assert torch.equal(generator.get_state(), twin.get_state())  # the step drew exactly the noise we fed
        ours.append(authors_parameters(model))
        grad, log_ws = authors_gradient(oracle[-1], x.double().numpy(), eps, k, objective)
        oracle.append(adam.update(oracle[-1], grad))
        oracle_log_ws.append(log_ws)
    return path.description, ours, oracle, bounds, oracle_log_ws


def check_trajectories(ours, oracle, bounds, oracle_log_ws, objective, tolerance, label):
    # The authors' one-step lag: the first update moves by the first moments, still 0.
    for name, value in ours[0].items():
        assert np.array_equal(ours[1][name], value), f"{label}: our first step moved {name}"
        assert np.array_equal(oracle[1][name], value), f"the oracle's first step moved {name}"
    moved, _ = max_difference(ours[-1], ours[0])  # not a trivial pass: 20 steps move the parameters by ~1e-2
    assert moved > max(1e-3, 100 * tolerance), f"{label}: the parameters hardly moved ({moved:.3g})"
    for step, (bound, log_ws) in enumerate(zip(bounds, oracle_log_ws, strict=True)):
        if objective == "vae":
            expected = log_ws.mean(axis=1)
        else:
            top = log_ws.max(axis=1)
            expected = top + np.log(np.exp(log_ws - top[:, None]).mean(axis=1))
        np.testing.assert_allclose(bound, expected, rtol=tolerance, err_msg=f"{label}: the bound of step {step + 1}")
    difference, where = max_difference(ours[-1], oracle[-1])
    message = f"{label}: max |ours - oracle| after {STEPS} steps = {difference:.3g} at {where} (moved {moved:.3g})"
    print(message)
    assert difference < tolerance, message


def test_oracle_gradient_matches_finite_differences() -> None:
    """The hand-written backward pass against central differences of the bound it differentiates, on a tiny
    two-layer model: sum over examples of log mean_i w_i (IWAE) and of mean_i log w_i (VAE)."""
    rng = np.random.default_rng(0)
    shapes = {"q0": (5, 4, 3), "q1": (3, 3, 2), "p0": (2, 3, 3), "p1": (3, 4, 5)}  # in, hidden, out
    params = {}
    for prefix, (n_in, n_hidden, n_out) in shapes.items():
        heads = ("mean",) if prefix == "p1" else ("mean", "sigma")  # p1 is p(x | h_1), Bernoulli
        layers = [("h0", n_in, n_hidden), ("h1", n_hidden, n_hidden), *((head, n_hidden, n_out) for head in heads)]
        for name, fan_in, fan_out in layers:
            params[f"{prefix}.{name}.W"] = rng.normal(0.0, 0.6, (fan_in, fan_out))
            params[f"{prefix}.{name}.b"] = rng.normal(0.0, 0.3, fan_out)
    batch, k = 3, 4
    x = (rng.random((batch, 5)) < 0.5).astype(np.float64)
    eps = [rng.standard_normal((batch * k, 3)), rng.standard_normal((batch * k, 2))]

    def bound(values, model_type):
        log_ws = authors_log_weights(values, x, eps, k)[0].reshape(batch, k)
        if model_type == "vae":
            return log_ws.mean(axis=1).sum()
        top = log_ws.max(axis=1, keepdims=True)
        return (top[:, 0] + np.log(np.exp(log_ws - top).mean(axis=1))).sum()

    errors = []
    for model_type in ("iwae", "vae"):
        grads, _ = authors_gradient(params, x, eps, k, model_type)
        for name, value in params.items():
            for index in np.ndindex(value.shape):
                shifted = {n: v.copy() for n, v in params.items()}
                shifted[name][index] = value[index] + 1e-6
                up = bound(shifted, model_type)
                shifted[name][index] = value[index] - 1e-6
                numeric = (up - bound(shifted, model_type)) / 2e-6
                errors.append(abs(numeric - grads[name][index]) / max(1.0, abs(numeric)))
    assert max(errors) < 1e-7, f"the oracle's gradient differs from central differences by up to {max(errors):.3g}"


@pytest.mark.parametrize("layers, objective, k", CASES)
def test_float64_chosen_path_follows_the_oracle(layers, objective, k, minibatches) -> None:
    """The path fit chooses for a float64 model: iwae.fast's explicit backpropagation in Python (not autograd:
    the C++ step serves float32 only)."""
    description, ours, oracle, bounds, log_ws = run_both(layers, objective, k, torch.float64, minibatches, fast=True)
    assert description.startswith("fast: explicit backpropagation in Python"), description
    label = f"float64 {description.split(' (')[0]}, {layers} layer(s), {objective} k={k}"
    check_trajectories(ours, oracle, bounds, log_ws, objective, FLOAT64_TOLERANCE, label)


@pytest.mark.parametrize("layers, objective, k", CASES)
def test_float64_reference_path_follows_the_oracle(layers, objective, k, minibatches) -> None:
    """The reference path (iwae.estimators and autograd), which ``fast = False`` runs."""
    description, ours, oracle, bounds, log_ws = run_both(layers, objective, k, torch.float64, minibatches, fast=False)
    assert description == "autograd"
    label = f"float64 autograd, {layers} layer(s), {objective} k={k}"
    check_trajectories(ours, oracle, bounds, log_ws, objective, FLOAT64_TOLERANCE, label)


@pytest.mark.parametrize("layers, objective, k", [(1, "iwae", 5), (2, "vae", 1)])
def test_float32_fast_path_follows_the_oracle(layers, objective, k, minibatches) -> None:
    """What a run on the CPU trains with: float32, the fast path (the C++ step where it builds), against the
    float64 oracle fed the same float32 start and noise."""
    description, ours, oracle, bounds, log_ws = run_both(layers, objective, k, torch.float32, minibatches, fast=True)
    assert description.startswith("fast: explicit backpropagation"), description
    label = f"float32 {description.split(' (')[0]}, {layers} layer(s), {objective} k={k}"
    check_trajectories(ours, oracle, bounds, log_ws, objective, FLOAT32_TOLERANCE, label)


def test_train_and_eval_as_the_authors_from_the_command_line(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    train = ["train", "--protocol", "authors", "--k", "3", "--epochs", "1", "--train-limit", "60", "--out", str(run),
             "--device", "cpu", "--no-progress"]  # fmt: skip
    assert cli.main(train) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["complete"] and runs.load_config(run).optimizer == "burda-adam"
    evaluate = ["eval", str(run), "--protocol", "authors", "--k", "5", "--limit", "20", "--device", "cpu",
                "--no-progress"]  # fmt: skip
    assert cli.main(evaluate) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["pruned_by"] == "authors" and len(result["active_units_authors"]) == 1
    assert (run / "eval-test-k5-seed0-limit20-authors.json").is_file()


@pytest.mark.slow
def test_table2_smoke_reproduces_the_authors_swap(tmp_path: Path, capsys) -> None:
    out = tmp_path / "table2"
    argv = ["reproduce", "table2", "--preset", "smoke", "--workers", "2", "--out", str(out), "--device", "cpu",
            "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["runs"] == 4 and summary["failed"] == {} and summary["preset"] == "table2-smoke"
    swap = out / "runs" / "swap-vae-k1-from-base-iwae-k50"
    config = runs.load_config(swap)
    assert (config.objective.name, config.k, config.fresh_optimizer) == ("vae", 1, False)
    steps = {float(s["step"]) for s in load_checkpoint(swap / runs.CHECKPOINT_FILE).optimizer_state["state"].values()}
    assert steps == {2 * math.ceil(500 / 20)}  # the base's 25 steps, continued by 25
    report = (out / "report" / "report.md").read_text() if (out / "report" / "report.md").is_file() else ""
    report = report or (out / "report.md").read_text()
    assert "iwae k=50" in report and "vae k=1" in report  # each row names both phases' objective and k


def test_the_student_studys_smoke_preset_reports_both_unit_counts_apart_from_burdas(tmp_path: Path, capsys) -> None:
    out = tmp_path / "student"
    argv = ["reproduce", "student", "--preset", "smoke", "--workers", "2", "--out", str(out), "--device", "cpu",
            "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["runs"] == 2 and summary["failed"] == {} and summary["preset"] == "student-smoke"
    config = runs.load_config(out / "runs" / "iwae-k5")
    assert (config.model.activation, config.batch_size, config.train_split) == ("relu", 128, "train+valid")
    report = (out / "report.md").read_text()
    assert "units: per-unit KL" in report and "(covariance)" in report
    assert "ReLU networks instead of tanh" in report and "all 60,000 training images" in report
