"""iwae.lab.reports.figures: the report's figures as PNG bytes (against k, learning curves, histograms of log A_u),
decoded, and what each plot holds (the figure is caught on its way to the PNG)."""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import pytest
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure
from PIL import Image

from iwae.config import TrainConfig
from iwae.lab.reports import figures
from iwae.lab.reports.records import Cell, RunRecord

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Invented cells (inputs for the plots, not measurements): four k-sweeps and a cell with no sweep.
CELLS = {
    ("mnist", 1, 5, "iwae"): Cell(88.0, (14.0,), 2, 7.5, nll_sd=0.5, seconds_sd=0.25),
    ("mnist", 1, 10, "iwae"): Cell(87.5, (15.0,), 1, 15.0),  # no paper number at k = 10
    ("mnist", 1, 50, "iwae"): Cell(87.0, (16.5,), 1, 75.0),
    ("mnist", 2, 1, "iwae"): Cell(86.0, (16.0, 4.0), 1, 2.0),
    ("mnist", 2, 50, "iwae"): Cell(84.0, (26.0, 7.5), 3, 90.0, nll_sd=0.25, seconds_sd=1.0),
    ("fashion-mnist", 1, 5, "vae"): Cell(240.0, (10.0,), 1, 8.0),  # no paper numbers at all
    ("fashion-mnist", 1, 50, "vae"): Cell(238.0, (12.0,), 1, 80.0),
    ("mnist-fixed", 1, 5, "iwae"): Cell(89.0, (20.0,), 1, 6.0),  # the paper's NLL, no active units
    ("mnist-fixed", 1, 50, "iwae"): Cell(88.5, (21.0,), 1, 60.0),
    ("omniglot", 1, 5, "vae"): Cell(110.0, (30.0,), 1, 9.0),  # one k: no sweep, not drawn
}


@pytest.fixture
def drawn(monkeypatch) -> list[Figure]:
    """The figures rendered, in order: each is caught as it goes to the PNG."""
    caught: list[Figure] = []
    render = figures._figure_bytes

    def catching(fig: Figure) -> bytes:
        caught.append(fig)
        return render(fig)

    monkeypatch.setattr(figures, "_figure_bytes", catching)
    return caught


def decoded(data: bytes | None) -> Image.Image:
    """The PNG, checked and fully decoded."""
    assert data is not None and data.startswith(PNG_SIGNATURE)
    Image.open(io.BytesIO(data)).verify()  # the chunks and their checksums
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG"
    image.load()  # every pixel
    assert image.getextrema() != ((255, 255), (255, 255), (255, 255), (255, 255))  # not a blank page
    return image


def record(label: str, metrics: list[dict[str, Any]] = (), log_activity: list[list[float]] = ()) -> RunRecord:
    return RunRecord(
        label=label, run_dir=f"/runs/{label}", dataset="mnist", layers=1, objective="iwae", k=5, seed=0,
        init_from=None, epochs=2, estimator="standard", variant="iwae", train_limit=None, nll=90.0, units=(10,),
        eval_k=10, eval_n=30, recon=-80.0, kl=20.0, seconds_per_epoch=1.0, train_bound=-100.0, valid_bound=-101.0,
        log_activity=[list(values) for values in log_activity], metrics=list(metrics), samples_png=None,
        config=TrainConfig(),
    )  # fmt: skip


def ours(figure: Figure) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Each error-bar series by its label: its points and its error bars' half-lengths."""
    (axis,) = figure.axes
    series = {}
    for container in axis.containers:
        assert isinstance(container, ErrorbarContainer)
        line, _, (bars,) = container.lines
        half = np.array([abs(segment[1, 1] - segment[0, 1]) / 2 for segment in bars.get_segments()])
        series[container.get_label()] = (line.get_xydata(), half)
    return series


def papers(figure: Figure) -> dict[str, tuple[np.ndarray, Any, str]]:
    """The paper's lines by their label: points, colour and line style."""
    (axis,) = figure.axes
    return {
        line.get_label(): (line.get_xydata(), line.get_color(), line.get_linestyle())
        for line in axis.get_lines()
        if line.get_label().endswith("(paper)")
    }


def colour_of(figure: Figure, label: str) -> Any:
    (container,) = [c for c in figure.axes[0].containers if c.get_label() == label]
    return container.lines[0].get_color()


def test_nll_against_k_sets_each_sweep_beside_the_papers_numbers(drawn: list[Figure]) -> None:
    image = decoded(figures.plot_against_k(CELLS, "nll"))
    assert image.size == (585, 378)  # 6.5 x 4.2 inches at 90 dpi
    (figure,) = drawn
    series = ours(figure)
    assert sorted(series) == [
        "iwae mnist 1L (ours)", "iwae mnist 2L (ours)", "iwae mnist-fixed 1L (ours)", "vae fashion-mnist 1L (ours)",
    ]  # fmt: skip
    points, half = series["iwae mnist 1L (ours)"]
    np.testing.assert_array_equal(points, [[5, 88.0], [10, 87.5], [50, 87.0]])
    np.testing.assert_allclose(half, [0.5, 0.0, 0.0], atol=1e-12)  # one seed: no error bar
    np.testing.assert_allclose(series["iwae mnist 2L (ours)"][1], [0.0, 0.25], atol=1e-12)
    published = papers(figure)
    assert sorted(published) == ["iwae mnist 1L (paper)", "iwae mnist 2L (paper)", "iwae mnist-fixed 1L (paper)"]
    points, colour, style = published["iwae mnist 1L (paper)"]
    np.testing.assert_array_equal(points, [[5, 85.54], [50, 84.78]])  # Table 1; none at k = 10
    assert style == "--" and colour == colour_of(figure, "iwae mnist 1L (ours)")
    np.testing.assert_array_equal(published["iwae mnist 2L (paper)"][0], [[1, 85.33], [50, 82.90]])
    np.testing.assert_array_equal(published["iwae mnist-fixed 1L (paper)"][0], [[5, 87.63], [50, 87.10]])
    (axis,) = figure.axes
    assert axis.get_xscale() == "log" and list(axis.get_xticks()) == [1, 5, 10, 50]
    assert [t.get_text() for t in axis.get_xticklabels()] == ["1", "5", "10", "50"]
    assert (axis.get_xlabel(), axis.get_ylabel()) == ("k (samples per example)", "test NLL (nats)")
    assert len(axis.get_legend().get_texts()) == 4 + 3


def test_active_units_against_k_are_summed_over_layers_beside_the_papers(drawn: list[Figure]) -> None:
    image = decoded(figures.plot_against_k(CELLS, "units"))
    assert image.size == (585, 378)
    (figure,) = drawn
    series = ours(figure)
    np.testing.assert_array_equal(series["iwae mnist 2L (ours)"][0], [[1, 20.0], [50, 33.5]])
    np.testing.assert_array_equal(series["iwae mnist 1L (ours)"][0], [[5, 14.0], [10, 15.0], [50, 16.5]])
    assert all(np.all(half == 0) for _, half in series.values())  # no spread for the units
    published = papers(figure)
    assert sorted(published) == ["iwae mnist 1L (paper)", "iwae mnist 2L (paper)"]  # mnist-fixed has no units
    np.testing.assert_array_equal(published["iwae mnist 1L (paper)"][0], [[5, 22], [50, 25]])
    np.testing.assert_array_equal(published["iwae mnist 2L (paper)"][0], [[1, 16 + 5], [50, 26 + 7]])
    assert figure.axes[0].get_ylabel() == "active units (all layers)"


def test_active_units_by_the_kl_are_drawn_beside_burdas_count_where_every_cell_has_them(drawn: list[Figure]) -> None:
    cells = {
        ("mnist", 1, 1, "iwae"): Cell(90.0, (20.0,), 1, 2.0, units_kl=(15.0,)),
        ("mnist", 1, 50, "iwae"): Cell(88.0, (27.0,), 1, 60.0, units_kl=(35.0,)),
        ("mnist", 2, 1, "iwae"): Cell(86.0, (16.0, 4.0), 1, 2.0, units_kl=(18.0, 5.0)),
        ("mnist", 2, 50, "iwae"): Cell(84.0, (26.0, 7.0), 1, 90.0),  # one cell without: no KL line for 2L
    }
    decoded(figures.plot_against_k(cells, "units", paper=False))
    (figure,) = drawn
    lines = {line.get_label(): line for line in figure.axes[0].get_lines() if "KL" in line.get_label()}
    assert sorted(lines) == [f"iwae mnist 1L ({figures.KL_UNITS})"]
    (line,) = lines.values()
    np.testing.assert_array_equal(line.get_xydata(), [[1, 15.0], [50, 35.0]])
    assert line.get_linestyle() == ":" and line.get_color() == colour_of(figure, "iwae mnist 1L")
    np.testing.assert_array_equal(ours(figure)["iwae mnist 1L"][0], [[1, 20.0], [50, 27.0]])  # Burda's, still


def test_seconds_against_k_have_no_paper_numbers(drawn: list[Figure]) -> None:
    decoded(figures.plot_against_k(CELLS, "seconds"))
    (figure,) = drawn
    series = ours(figure)
    assert sorted(series) == ["iwae mnist 1L", "iwae mnist 2L", "iwae mnist-fixed 1L", "vae fashion-mnist 1L"]
    points, half = series["iwae mnist 1L"]
    np.testing.assert_array_equal(points, [[5, 7.5], [10, 15.0], [50, 75.0]])
    np.testing.assert_allclose(half, [0.25, 0.0, 0.0], atol=1e-12)
    assert papers(figure) == {} and figure.axes[0].get_ylabel() == "seconds per epoch"


def test_without_the_paper_only_our_numbers_are_drawn(drawn: list[Figure]) -> None:
    decoded(figures.plot_against_k(CELLS, "nll", paper=False))
    (figure,) = drawn
    assert papers(figure) == {}
    assert sorted(ours(figure)) == ["iwae mnist 1L", "iwae mnist 2L", "iwae mnist-fixed 1L", "vae fashion-mnist 1L"]


def test_no_k_sweep_draws_no_figure(drawn: list[Figure]) -> None:
    assert figures.plot_against_k({}, "nll") is None
    one_k_each = {key: cell for key, cell in CELLS.items() if key[2] == 5}
    for quantity in ("nll", "units", "seconds"):
        assert figures.plot_against_k(one_k_each, quantity) is None
    assert drawn == []


def test_learning_curves_draw_the_training_bound_dashed_and_the_validation_bound_solid(drawn: list[Figure]) -> None:
    with_valid = record("a", [{"epoch": e, "train_bound": -110.0 + e, "valid_L50": -108.0 + e} for e in (1, 2, 3)])
    train_only = record("b", [{"epoch": 1, "train_bound": -120.0}, {"epoch": 2, "train_bound": -115.0}])
    image = decoded(figures.plot_learning_curves([with_valid, record("no metrics"), train_only]))
    assert image.size == (630, 405)  # 7 x 4.5 inches at 90 dpi
    (figure,) = drawn
    (axis,) = figure.axes
    lines = axis.get_lines()
    assert [line.get_linestyle() for line in lines] == ["--", "-", "--"]
    np.testing.assert_array_equal(lines[0].get_xydata(), [[1, -109.0], [2, -108.0], [3, -107.0]])
    np.testing.assert_array_equal(lines[1].get_xydata(), [[1, -107.0], [2, -106.0], [3, -105.0]])
    np.testing.assert_array_equal(lines[2].get_xydata(), [[1, -120.0], [2, -115.0]])
    assert lines[1].get_label() == "a (valid_L50)" and lines[0].get_color() == lines[1].get_color()
    assert [t.get_text() for t in axis.get_legend().get_texts()] == ["a (valid_L50)"]
    assert axis.get_xscale() == "linear" and axis.get_xlabel() == "epoch"


def test_learning_curves_of_more_than_20_epochs_have_a_log_epoch_axis(drawn: list[Figure]) -> None:
    long = record(
        "long", [{"epoch": e, "train_bound": -100.0 - 1 / e, "valid_L5": -101.0 - 1 / e} for e in range(1, 22)]
    )
    decoded(figures.plot_learning_curves([long]))
    assert drawn[0].axes[0].get_xscale() == "log"
    assert figures.plot_learning_curves([record("short", long.metrics[:20])]) is not None
    assert drawn[1].axes[0].get_xscale() == "linear"


def test_no_metrics_draw_no_learning_curves(drawn: list[Figure]) -> None:
    assert figures.plot_learning_curves([]) is None
    assert figures.plot_learning_curves([record("a"), record("b")]) is None
    assert drawn == []


def test_log_activity_draws_one_histogram_panel_per_run_three_a_row(drawn: list[Figure]) -> None:
    two_layers = [[-9.0, -8.0, -7.5, 0.1, 0.3], [-6.0, -0.5]]
    records = [record("r0", log_activity=two_layers), record("skipped")]
    records += [record(f"r{i}", log_activity=[[-1.0 * i, 0.5, 0.25]]) for i in (1, 2, 3)]
    image = decoded(figures.plot_log_activity(records))
    assert image.size == (1080, 504)  # 3 columns of 4 inches, 2 rows of 2.8 inches, at 90 dpi
    (figure,) = drawn
    axes = figure.axes
    assert len(axes) == 6
    assert [axis.get_title() for axis in axes[:4]] == ["r0", "r1", "r2", "r3"]
    assert [axis.axison for axis in axes] == [True, True, True, True, False, False]
    first = axes[0]
    assert [len(c.patches) for c in first.containers] == [30, 30]  # a histogram of 30 bins per layer
    assert [sum(p.get_height() for p in c.patches) for c in first.containers] == [5, 2]  # every value counted
    (threshold,) = first.get_lines()
    np.testing.assert_allclose(threshold.get_xdata(), [math.log(0.01)] * 2, rtol=1e-12)
    assert sorted(t.get_text() for t in first.get_legend().get_texts()) == ["layer 1", "layer 2", "log 0.01"]
    assert first.get_xlabel() == "log A_u"


def test_one_run_with_log_activity_gets_one_panel(drawn: list[Figure]) -> None:
    image = decoded(figures.plot_log_activity([record("only", log_activity=[[-3.0, 0.0]])]))
    assert image.size == (360, 252)  # 4 x 2.8 inches at 90 dpi
    assert [axis.get_title() for axis in drawn[0].axes] == ["only"]


def test_no_log_activity_draws_no_histograms(drawn: list[Figure]) -> None:
    assert figures.plot_log_activity([]) is None
    assert figures.plot_log_activity([record("a"), record("b")]) is None
    assert drawn == []


def test_the_figures_leave_pyplots_figures_alone() -> None:
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    figures.plot_against_k(CELLS, "nll")
    figures.plot_learning_curves([record("a", [{"epoch": 1, "train_bound": -1.0, "valid_L5": -2.0}])])
    figures.plot_log_activity([record("a", log_activity=[[0.0, 1.0]])])
    assert plt.get_fignums() == before
