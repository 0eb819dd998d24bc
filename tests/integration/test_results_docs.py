"""docs/_ext/results_docs.py: the pages' results agree with results/, and the generator on a made-up results folder
(a transcribed experiment, and one kept as run folders with a run finished, one in progress, one whose checkpoint
is lost and one not started), its Jinja2 templates, and the claim its curve's caption makes: a shorter Burda
schedule trains exactly the longer one's first passes."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "docs" / "_ext" / "results_docs.py"
SPEC = importlib.util.spec_from_file_location("results_docs", SCRIPT)
assert SPEC is not None and SPEC.loader is not None
results_docs = importlib.util.module_from_spec(SPEC)
sys.modules[SPEC.name] = results_docs  # dataclasses look their module up there
SPEC.loader.exec_module(results_docs)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_pages_agree_with_the_data(capsys) -> None:
    """docs/results.md, README.md and their figures are what results/ says (else: run docs/_ext/results_docs.py)."""
    code = results_docs.main(["--check"])
    assert code == 0, capsys.readouterr().err


def test_readme_stays_short() -> None:
    assert len((ROOT / "README.md").read_text().splitlines()) <= 150


# -- templates --------------------------------------------------------------------------------------------------------
NAMES = {"a": {"nll": 91.93, "units": [16, 5], "none": None}, "b": 86.76, "rows": [1, 2, 3], "missing": None}


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ (a.nll - b) | fmt('+.2f') }}", "+5.17"),
        ("{{ a['nll'] | fmt('.1f') }}", "91.9"),
        ("{{ a.units | units }}", "16+5"),
        ("{{ a.none | fmt('+.2f') }} and {{ a.none - b }} and {{ -missing.nll }}", "— and — and —"),
        ("{{ (b - b) | fmt('+.2f') }}", "+0.00"),
        ("{{ -0.001 | fmt('.2f') }}", "0.00"),
        ("{{ -a.nll | fmt('.1f') }}", "-91.9"),
        ("{{ 'yes' if a.nll > b else 'no' }}", "yes"),
        ("{{ max(rows) }} of {{ rows[-1] }}", "3 of 3"),
        ("{% raw %}{literal}{% endraw %}", "{literal}"),
        ("{{ 581 | duration }}, {{ 3540 | duration }}, {{ 16400 | duration }}, {{ 42 | duration }}",
         "9 min 41 s, 59 min, 4 h 33 min, 42 s"),
        ("{{ 119200 | fmt(',') }}", "119,200"),
        ("{{ (2 ** 0.5 * 0.13) | fmt('.1f') }}", "0.2"),
        ("{{ [1000, 5000] | map('fmt', ',') | join(' / ') }}", "1,000 / 5,000"),
        # a line of only {% %} tags leaves nothing; a list built with {% do %}
        ("{% set big = [] %}\n{% for r in rows if r > 1 %}{% do big.append(r * 2) %}{% endfor %}\nbig: {{ big }}",
         "big: [4, 6]"),
        ("| x |\n|---|\n{% for r in rows %}\n| {{ r }} |\n{% endfor %}\n", "| x |\n|---|\n| 1 |\n| 2 |\n| 3 |"),
    ],
)  # fmt: skip
def test_templates_take_their_values_from_the_names(template: str, expected: str) -> None:
    assert results_docs.render(template, NAMES) == expected


@pytest.mark.parametrize(
    ("template", "complaint", "line"),
    [
        ("{{ c }}", "'c' is undefined", 1),
        ("one\ntwo {{ a.ppl }}", "has no attribute 'ppl'", 2),
        ("{{ a.keys() }}", "has no attribute 'keys'", 1),  # a dict's fields, never its methods
        ("{{ b.__class__ }}", "unsafe", 1),
        ("{{ range(10 ** 9) | length }}", "Range too big", 1),
        ("{{ b(1) }}", "not callable", 1),
        ("{{ a.nll | fmt('q') }}", "Unknown format code 'q'", 1),
        ("{{ a.nll | fmt('.2f')", "unexpected end of template", 1),
        ("{{ a.nll + }}", "unexpected 'end of print statement'", 1),
        ("\n\n{{ a.nll | nosuch }}", "No filter named 'nosuch'", 3),
        ("{% for r in rows %}\n{{ r }}", "looking for the following tags: 'endfor'", 2),
    ],
)
def test_bad_templates_are_refused_with_a_reason_and_a_line(template: str, complaint: str, line: int) -> None:
    with pytest.raises(results_docs.ResultsError, match=complaint) as caught:
        results_docs.render(template, NAMES)
    assert caught.value.line == line


def test_templates_change_only_their_own_copy_of_the_data(made_up: Path) -> None:
    results = results_docs.load_results(made_up)
    quick = results.get("quick")

    def names(experiment: results_docs.Experiment) -> dict:
        return results_docs.namespace(results, experiment)

    assert results_docs.render("{% do rows.clear() %}{% do vae.units.append(1) %}", names(quick)) == ""
    assert results_docs.render("{{ rows | length }} {{ vae.units }}", names(quick)) == "2 [20]"


# -- a made-up results folder -----------------------------------------------------------------------------------------
def _config(schedule: str = "burda:3", k: int = 1):
    from iwae.lab.grid import train_config

    return train_config({"dataset": "mnist", "objective": "vae", "k": k, "schedule": schedule, "latent_dims": [4]})


def _write_run(folder: Path, epochs: int, checkpoint_epoch: int | None = None) -> None:
    """A run folder: config.json and ``epochs`` metric lines (invented values), and a checkpoint saved at
    ``checkpoint_epoch``."""
    from iwae.checkpoint import save_checkpoint
    from iwae.models import LatentVariableModel

    config = _config()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(config.to_json())
    lines = [
        {"epoch": e, "stage": 0, "lr": 1e-3, "train_bound": -100.0 + e, "valid_L50": -98.0 + e, "seconds": 2.0 + e}
        for e in range(1, epochs + 1)
    ]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    if checkpoint_epoch is not None:
        model = LatentVariableModel(config.model)
        optimizer = torch.optim.Adam(model.parameters())
        progress = {"epochs_done": checkpoint_epoch, "seconds": 1.0}
        path = folder / "checkpoint.safetensors"
        save_checkpoint(path, model, optimizer, torch.Generator(), progress, config.to_json())


EVALUATION = {  # invented: inputs for the formatting, not measurements
    "nll": 90.0,
    "nll_std_err": 0.5,
    "k": 5000,
    "split": "test",
    "n_examples": 10000,
    "active_units": [3],
    "active_units_authors": [4],
    "active_units_kl": [3],
    "nll_active_only": 89.9,
    "pruned_by": "ours",
    "seconds": 60.0,
}

PAGE = """# Made up

<!-- results:quick about -->
<!-- /results:quick -->

<!-- results:quick table
| model | ours | paper | full budget |
|---|---|---|---|
{% for row in rows if row.k == 1 %}
{% set full = outcome('full', row.run) or 'not run' %}
| {{ model(row.objective, row.k) }} | {{ result(row) }} | {{ result(row.paper) }} | {{ full }} |
{% endfor %}
-->
<!-- /results:quick -->

<!-- results:quick text
{% set gap = vae.nll - vae.paper.nll %}
The VAE is {{ gap | fmt('+.2f') }} nats above the paper's ({{ vae.paper.source }});
headline {{ headline | fmt('.1f') }}.
-->
<!-- /results:quick -->

<!-- results:full about -->
<!-- /results:full -->

<!-- results:full table
| run | where | NLL / units | passes |
|---|---|---|---|
{% for row in rows %}
| {{ row.run }} | {{ row.status }} | {{ result(row) }} | {{ row.epochs_done }} of {{ row.epochs }} |
{% endfor %}
-->
<!-- /results:full -->

<!-- results:full figure curve run=going prefix=quick.vae
Where it stands: {{ run.status }}; the shorter run has {{ prefix.epochs }} passes.
-->
<!-- /results:full -->
"""


@pytest.fixture
def made_up(tmp_path: Path) -> Path:
    """A repository root with results/ (invented numbers) and a page of blocks, not yet generated."""
    results = tmp_path / "results"
    quick = results / "quick"
    quick.mkdir(parents=True)
    meta = {
        "what": "a made-up experiment",
        "commands": [{"command": "iwae train --schedule burda:1", "wall_time_s": 581, "note": "alone"}],
        "budget": "1 pass",
        "date": "2026-01-01",
        "machine": "a laptop",
        "library_commit": None,
        "published": ["table1"],
        "data": "transcribed",
        "provenance": "made up for a test",
    }
    (quick / "experiment.json").write_text(json.dumps(meta))
    rows = [
        {"id": "vae", "run": "done", "dataset": "mnist", "layers": 1, "objective": "vae", "k": 1, "seed": 0,
         "epochs": 1, "nll": 95.0, "nll_std_err": 0.25, "units": [20]},
        {"id": "iwae5", "run": "other", "dataset": "mnist", "layers": 1, "objective": "iwae", "k": 5, "seed": 0,
         "epochs": 1, "nll": 94.0, "units": [21]},
    ]  # fmt: skip
    (quick / "summary.json").write_text(json.dumps({"rows": rows, "values": {"headline": 1.25}}))
    full = results / "full"
    full.mkdir()
    runs_meta = {**meta, "data": "runs", "runs": ["done", "going", "gone", "later"], "library_commit": "abc1234"}
    del runs_meta["provenance"]
    (full / "experiment.json").write_text(json.dumps(runs_meta))
    _write_run(full / "runs" / "done", epochs=13)
    (full / "runs" / "done" / "eval.json").write_text(json.dumps(EVALUATION))
    _write_run(results / "in-progress" / "full" / "going", epochs=5, checkpoint_epoch=4)
    _write_run(results / "in-progress" / "full" / "gone", epochs=2)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "results.md").write_text(PAGE)
    return tmp_path


def test_the_generator_fills_every_block_from_the_data(made_up: Path, capsys) -> None:
    assert results_docs.main(["--check"], root=made_up) == 1  # nothing generated yet: the summaries come first
    assert "results/full/summary.json: the summary of its runs is stale (and 7 more)" in capsys.readouterr().err
    assert results_docs.main([], root=made_up) == 0
    assert results_docs.main(["--check"], root=made_up) == 0
    page = (made_up / "docs" / "results.md").read_text()

    assert "- **Wall time**: 9 min 41 s (alone)" in page
    assert "- **Published**: Burda, Grosse & Salakhutdinov (ICLR 2016), Table 1" in page
    assert "- **Data**: `results/quick/summary.json`: made up for a test" in page
    assert "- **Measured**: 2026-01-01, a laptop; library commit abc1234" in page
    # the transcribed table: only k = 1 kept; the paper's number from iwae.lab.reports.published; the full run's cell
    assert "| VAE, k = 1 | 95.00 ± 0.25 / 20 | 86.76 / 19 | 90.00 ± 0.50 / 3 |" in page
    assert "IWAE, k = 5" not in page
    assert "The VAE is +8.24 nats above the paper's (Burda, Grosse & Salakhutdinov (ICLR 2016), Table 1);" in page
    assert "headline 1.2." in page  # 1.25 to one decimal, as Python rounds it
    # the run folders: finished, running (its checkpoint's epoch, not the metrics' last line), lost, planned
    assert "| done | finished: 13 passes, evaluated (results/full/runs/done) | 90.00 ± 0.50 / 3 | 13 of 13 |" in page
    assert "| going | running: epoch 4 of 13 (results/in-progress/full/going) | — | 4 of 13 |" in page
    assert "| gone | checkpoint lost after epoch 2 of 13 (results/in-progress/full/gone): to be restarted |" in page
    assert "| later | not started | — | 0 of — |" in page
    # the wall time of the runs: the sums of their epochs (up to the checkpoint for one in progress) and evaluation
    assert "done: 1 min 57 s of training over 13 passes + 1 min of evaluation" in page
    assert "going: 18 s of training over 4 passes so far" in page
    # the summary made from the runs
    summary = json.loads((made_up / "results" / "full" / "summary.json").read_text())
    states = {row["run"]: row["state"] for row in summary["rows"]}
    assert states == {"done": "finished", "going": "running", "gone": "lost", "later": "planned"}
    done = next(row for row in summary["rows"] if row["run"] == "done")
    assert (done["nll"], done["units"], done["units_authors"], done["protocol"]) == (90.0, [3], [4], "default")
    assert (done["objective_label"], done["objective_params"]) == ("vae", {})
    assert done["wall_seconds"] == pytest.approx(sum(2.0 + e for e in range(1, 14)) + 60.0)
    # the figure: drawn, linked relative to the page, its caption filled in, its data's digest in the PNG
    png = made_up / "docs" / "results" / "full-going-curve.png"
    assert "![full going: validation bound against passes](results/full-going-curve.png)" in page
    caption = "Where it stands: running: epoch 4 of 13 (results/in-progress/full/going); the shorter run has 1 passes."
    assert caption in page
    assert results_docs.png_digest(png) is not None


def test_the_check_names_what_the_data_changed(made_up: Path, capsys) -> None:
    assert results_docs.main([], root=made_up) == 0
    page = made_up / "docs" / "results.md"
    generated = page.read_text()

    summary = made_up / "results" / "quick" / "summary.json"
    data = json.loads(summary.read_text())
    data["rows"][0]["nll"] = 95.5
    summary.write_text(json.dumps(data))
    capsys.readouterr()
    assert results_docs.main(["--check"], root=made_up) == 1
    line = generated[: generated.index("<!-- results:quick table")].count("\n") + 1
    assert f"docs/results.md:{line}: block results:quick (table) is stale" in capsys.readouterr().err
    assert page.read_text() == generated  # --check writes nothing

    assert results_docs.main([], root=made_up) == 0
    assert "| VAE, k = 1 | 95.50 ± 0.25 / 20 |" in page.read_text()
    page.write_text(page.read_text().replace("95.50 ± 0.25", "95.40 ± 0.25"))  # a number typed by hand
    assert results_docs.main(["--check"], root=made_up) == 1
    assert "block results:quick (table) is stale" in capsys.readouterr().err

    # the run in progress moves on: its summary, table, wall time and figure are stale
    assert results_docs.main([], root=made_up) == 0
    going = made_up / "results" / "in-progress" / "full" / "going"
    (going / "checkpoint.safetensors").unlink()
    _write_run(going.with_name("going-next"), epochs=6, checkpoint_epoch=6)
    for name in ("checkpoint.safetensors", "metrics.jsonl"):
        (going.with_name("going-next") / name).replace(going / name)
    assert results_docs.main(["--check"], root=made_up) == 1
    assert "results/full/summary.json: the summary of its runs is stale" in capsys.readouterr().err
    assert results_docs.main([], root=made_up) == 0
    assert "running: epoch 6 of 13" in page.read_text()
    assert results_docs.main(["--check"], root=made_up) == 0


def test_broken_data_and_templates_exit_2_naming_the_place(made_up: Path, capsys) -> None:
    page = made_up / "docs" / "results.md"

    def line_of(text: str) -> int:
        return PAGE[: PAGE.index(text)].count("\n") + 1

    # a template's error names its line in the page
    page.write_text(PAGE.replace("{{ headline |", "{{ headlines |"))
    assert results_docs.main(["--check"], root=made_up) == 2
    where = f"docs/results.md:{line_of('headline {{')}: results:quick text: 'headlines' is undefined"
    assert where in capsys.readouterr().err
    page.write_text(PAGE.replace("{% endfor %}\n-->\n<!-- /results:quick", "-->\n<!-- /results:quick"))
    assert results_docs.main(["--check"], root=made_up) == 2
    assert f"docs/results.md:{line_of('| {{ model(')}: results:quick table: Unexpected end" in capsys.readouterr().err
    page.write_text(PAGE.replace("|---|---|---|---|\n{% for row in rows if", "{% for row in rows if"))
    assert results_docs.main(["--check"], root=made_up) == 2  # without its alignment line: not a table
    assert "results:quick table: a table template renders a header, an alignment line" in capsys.readouterr().err

    page.write_text(PAGE.replace("prefix=quick.vae", "prefix=quick.iwae5"))  # not the run's settings
    assert results_docs.main([], root=made_up) == 2
    assert "prefix=quick.iwae5: not this run's settings" in capsys.readouterr().err

    page.write_text(PAGE.replace("<!-- /results:full -->\n\n<!-- results:full figure", "<!-- results:full figure"))
    assert results_docs.main([], root=made_up) == 2  # a closing marker lost: the next block is not swallowed
    assert "results:full is not closed (<!-- /results:full -->) before the next block" in capsys.readouterr().err
    page.write_text(PAGE + "<!-- results:quick about -->\n")
    assert results_docs.main([], root=made_up) == 2
    assert "a results block without its closing marker" in capsys.readouterr().err
    assert page.read_text() == PAGE + "<!-- results:quick about -->\n"  # nothing written

    page.write_text(PAGE)
    going = made_up / "results" / "in-progress" / "full" / "done"
    going.mkdir(parents=True)  # a finished run's in-progress copy left behind
    assert results_docs.main([], root=made_up) == 2
    assert "left over from a run now in" in capsys.readouterr().err


# -- figures of several runs: -L_K against K, ln A_u, samples --------------------------------------------------------
RUNS_PAGE = """# Runs

<!-- results:full table
| run | binarisation | -L_K by K | reconstruction |
|---|---|---|---|
{% for row in rows if row.state == 'finished' %}
{% set bounds = [] %}{% for b in row.bounds %}{% do bounds.append(b.k ~ ': ' ~ (b.nll | fmt('.1f'))) %}{% endfor %}
| {{ row.run }} | {{ row.binarization }} | {{ bounds | join(' ') }} | {{ row.recon_log_lik | fmt('.1f') }} |
{% endfor %}
-->
<!-- /results:full -->

<!-- results:full figure bounds runs=done,later
The bound closes in as K grows.
-->
<!-- /results:full -->

<!-- results:full figure units runs=done
Units of {{ done.run }}.
-->
<!-- /results:full -->

<!-- results:full figure samples runs=later,done -->
<!-- /results:full -->
"""


def test_figures_of_runs_draw_the_bounds_by_k_the_units_and_the_samples(made_up: Path) -> None:
    from PIL import Image

    done = made_up / "results" / "full" / "runs" / "done"
    main = {**EVALUATION, "log_activity": [[-9.0, -8.5, -0.5]], "recon_log_lik": -70.0, "kl": 25.0, "elbo": -95.0}
    (done / "eval.json").write_text(json.dumps(main))
    (done / "eval-test-k5000-seed0.json").write_text(json.dumps(main))  # the same evaluation: counted once
    (done / "eval-test-k1-seed0.json").write_text(json.dumps({**EVALUATION, "k": 1, "nll": 95.0}))
    (done / "eval-test-k50-seed0.json").write_text(json.dumps({**EVALUATION, "k": 50, "nll": 91.0}))
    other_images = {**EVALUATION, "k": 5, "nll": 80.0, "n_examples": 100, "limit": 100}
    (done / "eval-test-k5-seed0-limit100.json").write_text(json.dumps(other_images))  # other images: left out
    thresholded = {**EVALUATION, "nll": 99.0, "binarization": "threshold"}  # the same images, thresholded
    (done / "eval-test-k5000-seed0-threshold.json").write_text(json.dumps(thresholded))
    page = made_up / "docs" / "results.md"
    page.write_text(RUNS_PAGE)
    assert results_docs.main([], root=made_up) == 0
    text = page.read_text()
    assert "| done | — | 1: 95.0 50: 91.0 5000: 90.0 | -70.0 |" in text  # binarisation: the dataset's own
    row = json.loads((made_up / "results" / "full" / "summary.json").read_text())["rows"][0]
    assert row["crossed"] == [{"binarization": "threshold", "nll": 99.0, "nll_std_err": 0.5}]
    assert "results/full-bounds-done.png" in text  # 'later' has no evaluation yet: not drawn
    assert "results/full-units-done.png" in text
    assert "*No data to draw yet.*" in text  # no samples.png yet
    bounds = made_up / "docs" / "results" / "full-bounds-done.png"
    digest = results_docs.png_digest(bounds)
    assert digest is not None

    Image.new("RGB", (40, 30), "white").save(done / "samples.png")
    assert results_docs.main(["--check"], root=made_up) == 1  # a new picture makes its block stale
    assert results_docs.main([], root=made_up) == 0
    samples = made_up / "docs" / "results" / "full-samples-done.png"
    assert "![full: samples of done](results/full-samples-done.png)" in page.read_text()
    assert results_docs.png_digest(samples) is not None
    Image.new("RGB", (40, 30), "black").save(done / "samples.png")  # the picture changes: the figure is stale
    assert results_docs.main(["--check"], root=made_up) == 1
    (done / "eval-test-k1-seed0.json").write_text(json.dumps({**EVALUATION, "k": 1, "nll": 96.0}))
    assert results_docs.main([], root=made_up) == 0
    assert results_docs.png_digest(bounds) != digest  # the bound at K = 1 moved: redrawn
    assert results_docs.main(["--check"], root=made_up) == 0

    page.write_text(RUNS_PAGE.replace("bounds runs=done,later", "bounds"))
    assert results_docs.main(["--check"], root=made_up) == 2
    (done / "eval-test-k1-seed0.json").write_text("[]")
    page.write_text(RUNS_PAGE)
    assert results_docs.main(["--check"], root=made_up) == 2


def test_the_units_against_k_figure_draws_both_counts_and_the_published_ones(made_up: Path, monkeypatch) -> None:
    from iwae.lab.reports import published

    full = made_up / "results" / "full"
    later = full / "runs" / "later"
    _write_run(later, epochs=13)
    (later / "config.json").write_text(_config(k=5).to_json())
    (full / "runs" / "done" / "eval.json").write_text(json.dumps({**EVALUATION, "active_units_kl": [2]}))
    (later / "eval.json").write_text(json.dumps({**EVALUATION, "active_units": [4], "active_units_kl": [1]}))
    monkeypatch.setattr(published, "PUBLISHED_STUDENT", {1: (None, 7), 3: (80.0, 9)})  # invented counts
    experiment = results_docs.load_results(made_up).get("full")
    spec = results_docs.units_k_figure({"published": "student"}, results_docs.load_results(made_up), experiment)
    assert spec is not None
    assert [(line["x"], line["y"]) for line in spec.lines] == [([1, 5], [3, 4]), ([1, 5], [2, 1])]
    assert [(point["x"], point["y"]) for point in spec.points] == [(1, 7)]  # k = 3 was not trained: left out
    with pytest.raises(results_docs.ResultsError, match="published=paper"):
        results_docs.units_k_figure({"published": "paper"}, results_docs.load_results(made_up), experiment)
    (later / "eval.json").write_text(json.dumps({**EVALUATION, "active_units_kl": None}))
    experiment = results_docs.load_results(made_up).get("full")
    spec = results_docs.units_k_figure({}, results_docs.load_results(made_up), experiment)
    assert spec is not None and len(spec.lines) == 1 and not spec.points  # a run without the KL count: not drawn
    (later / "eval.json").unlink()
    experiment = results_docs.load_results(made_up).get("full")
    assert results_docs.units_k_figure({}, results_docs.load_results(made_up), experiment) is None  # one evaluated


def test_an_experiment_kept_as_the_commands_outputs(made_up: Path, capsys) -> None:
    """``"data": "outputs"``: the keys of the command's own JSON files are the templates' values."""
    folder = made_up / "results" / "study"
    folder.mkdir()
    meta = json.loads((made_up / "results" / "quick" / "experiment.json").read_text())
    meta.update(data="outputs", outputs=["study.json", "more.json"])
    del meta["provenance"]
    (folder / "experiment.json").write_text(json.dumps(meta))
    (folder / "study.json").write_text(json.dumps({"score": -1.25, "by": {"vae": 0.5}}))
    (folder / "more.json").write_text(json.dumps({"extra": 3}))
    page = made_up / "docs" / "results.md"
    page.write_text(
        "<!-- results:study about -->\n<!-- /results:study -->\n\n<!-- results:study text\n"
        "{{ score | fmt('.2f') }} {{ by.vae }} {{ extra }}\n-->\n<!-- /results:study -->\n"
    )
    assert results_docs.main([], root=made_up) == 0
    text = page.read_text()
    assert "-1.25 0.5 3" in text
    assert "- **Data**: `results/study/study.json`, `results/study/more.json`: the command's own output" in text
    assert not (folder / "summary.json").exists()
    (folder / "more.json").write_text(json.dumps({"score": 1}))
    assert results_docs.main(["--check"], root=made_up) == 2
    assert "results/study/more.json: score given by another output too" in capsys.readouterr().err
    (folder / "more.json").write_text("[1]")
    assert results_docs.main(["--check"], root=made_up) == 2
    assert "a command's output is a JSON object" in capsys.readouterr().err
    (folder / "more.json").write_text(json.dumps({"score": 1}))  # named: each file's object under its name
    (folder / "experiment.json").write_text(json.dumps({**meta, "outputs": {"a": "study.json", "b": "more.json"}}))
    template = "{{ score | fmt('.2f') }} {{ by.vae }} {{ extra }}"
    page.write_text(page.read_text().replace(template, "{{ a.score }} {{ b.score }}"))
    assert results_docs.main([], root=made_up) == 0
    assert "-1.25 1" in page.read_text()


def test_paired_compares_two_runs_on_the_same_examples(made_up: Path, capsys) -> None:
    """``paired(a, b)``: a's NLL minus b's with the standard error of the per-example differences, from the files
    the evaluations kept (their path is the rows' ``per_example``); None where one kept none; different images
    are refused."""
    from iwae.checkpoint import save_per_example

    folder = made_up / "results" / "pair"
    meta = json.loads((made_up / "results" / "full" / "experiment.json").read_text())
    folder.mkdir()
    (folder / "experiment.json").write_text(json.dumps({**meta, "runs": ["a", "b", "c"]}))
    offsets = {"a": 0.0, "b": 0.5, "c": 0.0}
    shared = torch.linspace(-120.0, -60.0, 8, dtype=torch.float64)
    for name, offset in offsets.items():
        run = folder / "runs" / name
        _write_run(run, epochs=13)
        values = shared - offset + 0.1 * torch.arange(8, dtype=torch.float64) % 3
        evaluation = {**EVALUATION, "nll": -values.mean().item(), "n_examples": 8}
        if name != "c":
            evaluation["per_example_file"] = "eval-test.per-example.safetensors"
            save_per_example(run / evaluation["per_example_file"], {"log_lik": values}, "sha256:images")
        (run / "eval.json").write_text(json.dumps(evaluation))
    page = made_up / "docs" / "results.md"
    template = (
        "{% set p = paired(b, a) %}{{ p.difference | fmt('.3f') }} ± {{ p.std_err | fmt('.3f') }} on {{ p.n }}; "
        "{{ paired(a, c) is none }}; {{ b.per_example }}"
    )
    page.write_text(f"<!-- results:pair text\n{template}\n-->\n<!-- /results:pair -->\n")
    assert results_docs.main([], root=made_up) == 0
    assert "0.500 ± 0.000 on 8; True; results/pair/runs/b/eval-test.per-example.safetensors" in page.read_text()
    save_per_example(folder / "runs" / "a" / "eval-test.per-example.safetensors", {"log_lik": shared}, "sha256:other")
    assert results_docs.main(["--check"], root=made_up) == 2
    assert "scored different examples" in capsys.readouterr().err


# -- the claim of the full run's caption ------------------------------------------------------------------------------
def test_a_shorter_burda_schedule_trains_the_longer_ones_first_passes(tmp_path: Path, mnist) -> None:
    """``--schedule burda:2`` and the first 4 passes of ``--schedule burda:3``, same seed: the same computation."""
    from iwae.checkpoint import load_checkpoint, load_model_state
    from iwae.lab.grid import train_config
    from iwae.runs import parse_metrics
    from iwae.train import fit

    tiny = {"dataset": "mnist", "objective": "vae", "k": 1, "latent_dims": [4], "train_limit": 100, "valid_k": 2}
    short, long = train_config({**tiny, "schedule": "burda:2"}), train_config({**tiny, "schedule": "burda:3"})
    fit(short, tmp_path / "short", dataset=mnist, progress=False)
    fit(long, tmp_path / "long", dataset=mnist, progress=False, max_epochs=short.total_epochs)

    def trajectory(run: Path) -> list[tuple[float, float, float]]:
        return [(m["lr"], m["train_bound"], m["valid_L2"]) for m in parse_metrics(run / "metrics.jsonl")]

    assert len(trajectory(tmp_path / "short")) == short.total_epochs == 4
    assert trajectory(tmp_path / "short") == trajectory(tmp_path / "long")
    model, _ = load_model_state(tmp_path / "short" / "model.safetensors")
    checkpoint = load_checkpoint(tmp_path / "long" / "checkpoint.safetensors")
    assert checkpoint.progress["epochs_done"] == 4
    assert all(torch.equal(model[name], checkpoint.model_state[name]) for name in model)
    assert all(math.isfinite(value) for _, bound, valid in trajectory(tmp_path / "short") for value in (bound, valid))
