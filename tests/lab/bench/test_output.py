"""iwae.lab.bench.output: the bench's result as Markdown, and its two files (``bench.json``, ``bench.md``)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from iwae.lab.bench import output


def _train(impl: str, layers: int, k: int, batch: int, ms: float | None, per_s: float | None, gflops: float | None,
           status: str = "ok") -> dict[str, Any]:  # fmt: skip
    task = "matmul-roofline" if impl == "roofline" else "train"
    return {"task": task, "impl": impl, "layers": layers, "k": k, "batch": batch, "ms_per_step": ms,
            "examples_per_s": per_s, "gflops": gflops, "status": status}  # fmt: skip


def made_up_result(**changes: Any) -> dict[str, Any]:
    """A bench result with invented numbers (inputs for the layout, not measurements): two cells, both at minibatch
    20, Pyro skipped in the first and timed in the second, the roofline missing in the second."""
    rows = [
        _train("iwae", 1, 5, 20, 2.5, 8000.0, 12.34),
        _train("plain", 1, 5, 20, 5.0, 4000.0, 6.5),
        _train("pyro", 1, 5, 20, None, None, None, "skipped: no pyro"),
        _train("roofline", 1, 5, 20, 0.75, None, 40.0),
        _train("iwae", 2, 50, 20, 10.0, 10000.0, 100.0),
        _train("plain", 2, 50, 20, 25.0, 4000.0, 40.0),
        _train("pyro", 2, 50, 20, 50.0, 2000.0, 20.0),
        _train("roofline", 2, 50, 20, None, None, None),
        {"task": "eval", "impl": "iwae", "layers": 1, "seconds": 0.1},
    ]
    comparisons = [
        {"layers": 1, "k": 5, "batch": 20, "roofline_fraction": 0.3085, "speedup_vs_plain": 2.0,
         "speedup_vs_pyro": None, "burda_schedule_hours": 20.37},
        {"layers": 2, "k": 50, "batch": 20, "roofline_fraction": None, "speedup_vs_plain": 2.5,
         "speedup_vs_pyro": 5.0, "burda_schedule_hours": 3.0},
    ]  # fmt: skip
    result = {
        "mode": "test",
        "device_name": "cpu",
        "threads": 1,
        "torch_version": "9.9.9",
        "pyro_version": None,
        "native_kernels": "made-up kernels",
        "gradients": "made-up gradients",
        "allocator": "made-up malloc",
        "compile": False,
        "repeats": 3,
        "warmup": 1,
        "n_train": 100,
        "rows": rows,
        "comparisons": comparisons,
        "eval_s_per_1000_k5000": 12.34,
        "eval_peak_rss_mb": 123.4,
        "eval_peak_rss_total_mb": 456.6,
        "eval_cuda_peak_mb": None,
        "notes": ["measured on 2 images", "first note", "second note"],
        "seconds": 41.6,
    }
    result.update(changes)
    return result


def test_markdown_lays_out_one_row_per_cell_with_the_ratios_and_dashes_for_what_is_missing() -> None:
    lines = output.markdown(made_up_result()).splitlines()
    table = [line for line in lines if line.startswith("| ") and line[2].isdigit()]
    assert table == [
        "| 1 | 5 | 20 | 2.50 ms · 8,000/s · 12.3 | 5.00 ms · 4,000/s · 6.5 | skipped: no pyro | 40.0 | 0.31 | 2.00x "
        "| – |",
        "| 2 | 50 | 20 | 10.00 ms · 10,000/s · 100.0 | 25.00 ms · 4,000/s · 40.0 | 50.00 ms · 2,000/s · 20.0 | – "
        "| – | 2.50x | 5.00x |",
    ]
    header = lines.index(
        "| layers | k | batch | iwae | plain PyTorch | Pyro | matmul roofline GFLOP/s | iwae / roofline "
        "| iwae vs plain | iwae vs Pyro |"
    )
    assert lines[header + 1] == "|---:|---:|---:|---|---|---|---:|---:|---:|---:|"
    assert lines[header + 2] == table[0]  # the rows follow the header, in the comparisons' order


def test_markdown_says_the_setup_the_schedule_the_evaluation_and_the_notes() -> None:
    text = output.markdown(made_up_result())
    lines = text.splitlines()
    assert text.endswith("\n") and not text.endswith("\n\n")
    assert lines[0] == "## iwae bench (test): cpu, 1 threads, torch 9.9.9, pyro not installed"
    assert (
        "Native CPU paths (iwae.fast.native): made-up kernels. Gradients: made-up gradients. "
        "Training steps' malloc: made-up malloc."
    ) in lines
    assert (
        "Training steps (IWAE objective, standard estimator), median of 3 after 1 warm-up steps, first 100 MNIST "
        "training images binarised dynamically. Cells: ms/step · examples/s · GFLOP/s."
    ) in lines
    assert (
        "Burda's schedule (3,280 passes over 59,600 images at minibatch 20, validation not counted) at iwae's "
        "step times: 1 layer k = 5: 20.4 h, 2 layers k = 50: 3.0 h."
    ) in lines
    assert (
        "Evaluation: L_5000 takes 12.3 s per 1,000 test images (measured on 2 images); peak memory 123 MB above "
        "the worker's baseline (457 MB in all)."
    ) in lines
    assert lines[-3:] == ["- first note", "- second note", "- total time 42 s"]  # the first note is the eval's
    assert "- measured on 2 images" not in lines


def test_markdown_names_pyro_compile_and_cuda_where_the_result_has_them() -> None:
    result = made_up_result(
        pyro_version="1.9.1", compile=True, eval_cuda_peak_mb=789.2, eval_peak_rss_mb=None, device_name="H100"
    )
    del result["allocator"]  # results from before the allocator was recorded
    lines = output.markdown(result).splitlines()
    assert lines[0] == "## iwae bench (test): H100, 1 threads, torch 9.9.9, pyro 1.9.1"
    assert any(line.startswith("Training steps (IWAE objective, standard estimator; iwae through --compile), ")
               for line in lines)  # fmt: skip
    assert any(line.endswith("Training steps' malloc: not recorded.") for line in lines)
    (evaluation,) = [line for line in lines if line.startswith("Evaluation: ")]
    assert evaluation.endswith("; peak memory – above the worker's baseline (457 MB in all), CUDA peak 789 MB.")


def test_markdown_has_no_schedule_line_without_a_minibatch_20_cell() -> None:
    result = made_up_result()
    for comparison in result["comparisons"]:
        comparison["burda_schedule_hours"] = None
    text = output.markdown(result)
    assert "Burda's schedule" not in text
    assert "| 1 | 5 | 20 | 2.50 ms" in text  # the table itself is unchanged


def test_write_outputs_writes_the_result_as_json_and_markdown_in_a_new_folder(tiny_result: dict, tmp_path) -> None:
    out = tmp_path / "a" / "b"
    json_path, md_path = output.write_outputs(tiny_result, out)
    assert (json_path, md_path) == (out / "bench.json", out / "bench.md")
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md"]
    text = json_path.read_text(encoding="utf-8")
    assert json.loads(text) == tiny_result and text.endswith("}\n") and text.startswith('{\n  "')
    markdown = md_path.read_text(encoding="utf-8")
    assert markdown == output.markdown(tiny_result)
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and line[2].isdigit()]
    cells = [(c["layers"], c["k"], c["batch"]) for c in tiny_result["comparisons"]]
    assert (
        [tuple(int(x) for x in row.split("|")[1:4]) for row in rows]
        == cells
        == [(1, 5, 20), (1, 5, 100), (1, 50, 20), (1, 50, 100)]
    )


def test_write_outputs_replaces_earlier_files(tmp_path: Path) -> None:
    output.write_outputs(made_up_result(mode="first"), tmp_path)
    json_path, md_path = output.write_outputs(made_up_result(mode="second"), str(tmp_path))  # a str is a folder too
    assert json.loads(json_path.read_text())["mode"] == "second"
    assert md_path.read_text().startswith("## iwae bench (second): ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.json", "bench.md"]  # no temporary files left


def test_a_result_that_is_not_json_writes_neither_file(tmp_path: Path) -> None:
    result = made_up_result(threads={1, 2})
    with pytest.raises(TypeError):
        output.write_outputs(result, tmp_path / "out")
    assert not (tmp_path / "out" / "bench.json").exists() and not (tmp_path / "out" / "bench.md").exists()


def test_markdown_leaves_the_result_as_it_was() -> None:
    result = made_up_result()
    before = copy.deepcopy(result)
    output.markdown(result)
    assert result == before
