"""iwae.lab.reports.published: the published numbers, as transcribed in docs/references.md."""

from __future__ import annotations

from pathlib import Path

from iwae.lab.reports import PUBLISHED_TABLE1, PUBLISHED_TABLE2
from iwae.lab.reports.published import PUBLISHED_RAINFORTH, PUBLISHED_STUDENT, RAINFORTH_SOURCE, STUDENT_SOURCE

# The published numbers as transcribed, each table under its source, in the repository's docs/references.md.
REFERENCES = Path(__file__).resolve().parents[3] / "docs" / "references.md"


def _references_table(heading: str) -> list[list[str]]:
    """The body rows of the Markdown table under ``### heading`` in docs/references.md, cells stripped."""
    section = REFERENCES.read_text().split(f"\n### {heading}\n", 1)[1].split("\n### ", 1)[0]
    lines = [line for line in section.splitlines() if line.startswith("|")]
    assert len(lines) > 2, heading
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_published_numbers_match_docs_references() -> None:
    table1: dict[tuple[str, int, int, str], tuple[float, tuple[int, ...] | None]] = {}
    for dataset, heading in (
        ("mnist", "Burda et al. Table 1: MNIST, dynamic binarisation"),
        ("omniglot", "Burda et al. Table 1: OMNIGLOT"),
    ):
        for layers, k, vae, iwae in _references_table(heading):
            for objective, cell in (("vae", vae), ("iwae", iwae)):
                nll, units = cell.split(" / ")
                table1[(dataset, int(layers), int(k), objective)] = (float(nll), tuple(map(int, units.split("+"))))
    for layers, k, vae, iwae in _references_table("Burda et al. Appendix D: MNIST, fixed binarisation"):
        for objective, nll in (("vae", vae), ("iwae", iwae)):  # NLL only
            table1[("mnist-fixed", int(layers), int(k), objective)] = (float(nll), None)
    assert len(table1) == 36 and table1 == PUBLISHED_TABLE1

    def run(cell: str) -> tuple[str, int]:  # "IWAE, k = 50" -> ("iwae", 50)
        objective, k = cell.split(", k = ")
        return objective.lower(), int(k)

    def result(cell: str) -> tuple[float, tuple[int, ...]]:  # "84.88 / 22" -> (84.88, (22,))
        nll, units = cell.split(" / ")
        return float(nll), (int(units),)

    table2 = {
        (run(base), run(to)): {"base": result(base_cell), "continued": result(to_cell)}
        for base, base_cell, to, to_cell in _references_table("Burda et al. Table 2: the objective swap")
    }
    assert table2 == PUBLISHED_TABLE2

    rainforth = dict(_references_table("Rainforth et al. (ICML 2018): MNIST (unverified)"))
    rows = {
        ("iwae", "standard", 64): "IWAE (K = 64)",
        ("miwae(M=8)", "standard", 64): "MIWAE (M = 8, K = 8)",
        ("piwae(M=8)", "standard", 64): "PIWAE (M = 8, K = 8)",
        ("ciwae(beta=0.05)", "standard", 64): "CIWAE (beta = 0.05)",
        ("vae", "standard", 64): "VAE (M = 64)",
    }
    assert {key: float(rainforth[row]) for key, row in rows.items()} == PUBLISHED_RAINFORTH
    assert "unverified" in RAINFORTH_SOURCE  # secondary sources: reports must say so

    def number(cell: str, kind: type) -> float | int | None:
        return None if cell == "—" else kind(cell)

    student = {
        int(k): (number(nll, float), number(units, int))
        for k, nll, units in _references_table("A student reproduction (unverified)")
    }
    assert student == PUBLISHED_STUDENT and "unverified" in STUDENT_SOURCE
