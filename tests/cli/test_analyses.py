"""``iwae posterior``, ``iwae camel``, ``iwae anomaly`` and ``iwae impute`` (iwae.cli.analyses): each study from
the command line on a tiny budget, its one-line errors, and the old sample flags reaching the studies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from iwae.cli import main
from iwae.config import TrainConfig
from iwae.data import Dataset
from iwae.models import ModelConfig
from iwae.studies.anomaly import SCORES

pytestmark = pytest.mark.usefixtures("one_thread")


def test_old_flags_reach_the_studies(tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    from iwae.studies import anomaly, impute

    seen = {}
    monkeypatch.setattr(anomaly, "anomaly_run", lambda run, **kw: seen.update(anomaly=kw) or {"L": kw["n_samples"]})
    monkeypatch.setattr(impute, "impute_run", lambda dataset, settings, out, **kw: seen.update(impute=settings) or {})
    assert main(["anomaly", str(tmp_path), "--L", "4", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out) == {"L": 4}
    assert main(["impute", "--K", "5", "--L", "6", "--out", str(tmp_path), "--json", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: --K is deprecated; use --k" in err and "warning: --L is deprecated; use --impute-k" in err
    assert seen["anomaly"]["n_samples"] == 4
    assert (seen["impute"].k, seen["impute"].n_impute) == (5, 6)


def tiny_run(run_dir: Path, mnist: Dataset, latent_dims: tuple[int, ...], n_train: int = 100) -> str:
    """A one-epoch MNIST run on a few examples, validated on 20 with k = 5 (seconds on one core)."""
    from iwae.train import fit

    small = Dataset("mnist", mnist.train.subset(n_train), mnist.valid.subset(20), mnist.test, mnist.binarization)
    model = ModelConfig(latent_dims=latent_dims, hidden_dims=((200, 200),))
    config = TrainConfig(objective="iwae", k=2, model=model, stages=((1, 1e-3),), valid_k=5)
    fit(config, run_dir, device="cpu", dataset=small, progress=False)
    return str(run_dir)


def test_posterior_cli_on_a_tiny_2d_run(tmp_path: Path, capsys, mnist) -> None:
    run = tiny_run(tmp_path / "run", mnist, (2,))
    out = tmp_path / "post"
    code = main(["posterior", run, "--ks", "1,5", "--digits", "2", "--draws", "200", "--grid", "30", "--out", str(out),
                 "--json", "--no-progress", "--device", "cpu"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert set(result["mean_tv_density"]) == {"1", "5"}
    assert all(0.0 <= v <= 1.0 for v in result["tv_density"]["5"])
    for key in ("posterior_png", "reconstructions_png"):
        assert Path(result[key]).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "posterior.json").read_text())["ks"] == [1, 5]


def test_posterior_cli_rejects_a_non_2d_run(tmp_path: Path, capsys, mnist) -> None:
    run = tiny_run(tmp_path / "run", mnist, (3,), n_train=20)
    code = main(["posterior", run, "--no-progress", "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert "2-D latent" in captured.err and len(captured.err.strip().splitlines()) == 1


def test_camel_cli_tiny_budget(tmp_path: Path, capsys) -> None:
    code = main(["camel", "--json", "--out", str(tmp_path), "--epochs", "2", "--n-train", "400", "--n-test", "200",
                 "--eval-k", "100", "--no-progress"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert {"true", "vae", "iwae"} <= set(result)
    assert abs(result["true"] + 1.3585) < 5e-4
    # Every model's expected log-likelihood is below the true one's up to Monte Carlo noise of the test sample.
    assert result["vae"] < result["true"] + 0.1 and result["iwae"] < result["true"] + 0.1
    assert Path(result["png"]).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "camel.json").read_text())["true"] == result["true"]


def test_anomaly_cli_smoke(tmp_path: Path, capsys, mnist, shared_data) -> None:
    from iwae.train import fit

    small = Dataset("mnist", mnist.train.subset(60), mnist.valid.subset(20), mnist.test, mnist.binarization)
    config = TrainConfig(k=2, model=ModelConfig(latent_dims=(2,)), stages=((1, 1e-3),), valid_k=5)
    run = str(fit(config, tmp_path / "run", device="cpu", dataset=small, progress=False).run_dir)
    out = tmp_path / "anomaly"
    code = main(["anomaly", run, "--k", "3", "--limit", "40", "--holdout-digit", "3", "--holdout-epochs", "1",
                 "--holdout-train-limit", "60", "--data-dir", str(shared_data), "--out", str(out), "--json",
                 "--no-progress", "--device", "cpu"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert len(result["auroc"]) == 2
    for values in result["auroc"].values():
        assert set(values) == set(SCORES) and all(0.0 <= v <= 1.0 for v in values.values())
    assert Path(result["png"]).read_bytes()[:4] == b"\x89PNG"
    assert (out / "anomaly.md").read_text().startswith("| score |")
    assert (out / "holdout-3" / "model.safetensors").is_file()


def test_impute_cli_breast_cancer_smoke(tmp_path: Path, capsys) -> None:
    pytest.importorskip("sklearn")
    code = main(["impute", "--dataset", "breast-cancer", "--epochs", "2", "--k", "3", "--impute-k", "20",
                 "--multiple", "3", "--limit", "120", "--out", str(tmp_path), "--json", "--no-progress"])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["n"] == 120 and result["p"] == 30 and result["likelihood"] == "gaussian"
    assert {"mean", "miwae_k3_snis", "miwae_k3_sir_average", "elbo_k1_snis"} <= set(result["mse"])
    assert (tmp_path / "impute.md").read_text().startswith("| method")


def test_impute_cli_rejects_bad_missing_rate(capsys) -> None:
    assert main(["impute", "--missing", "1.5", "--out", "x"]) == 2
    assert "missing" in capsys.readouterr().err
