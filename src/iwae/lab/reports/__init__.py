"""Reports: our Table 1 / Table 2 / k-sweep beside Burda et al.'s, with figures, as Markdown and HTML.

Every number in a report comes from the sweep databases (:mod:`iwae.lab.store`), where the runner stores
evaluation results, per-epoch metrics and timings. The published numbers come from :data:`PUBLISHED_TABLE1` and
:data:`PUBLISHED_TABLE2` (Burda, Grosse and Salakhutdinov, "Importance Weighted Autoencoders", ICLR 2016, Tables 1
and 2 and Appendix D, as transcribed in docs/references.md). They stand beside our runs in Burda's setup only
(:func:`is_comparable`); the others go into :func:`not_comparable_table`, whose note quotes
:func:`burda_departures`. Only the sample grids are read from the PNG files whose paths the database records.
``REPORT.md`` links its figures from ``REPORT_files/``; ``REPORT.html`` embeds them as base64 PNG and stands alone.

No tensors are handled here (the package's ``[k, batch, ...]`` shape convention does not arise);
the histograms of log A_u use the per-unit values stored in each run's evaluation.

The modules: :mod:`~iwae.lab.reports.published` (the paper's numbers), :mod:`~iwae.lab.reports.records` (runs
from the databases, grouped into cells), :mod:`~iwae.lab.reports.tables`, :mod:`~iwae.lab.reports.figures` and
:mod:`~iwae.lab.reports.render` (the report assembled, as Markdown and HTML; :func:`write_report`).
"""

from __future__ import annotations

from iwae.lab.reports.published import PUBLISHED_RAINFORTH, PUBLISHED_TABLE1, PUBLISHED_TABLE2
from iwae.lab.reports.records import RunRecord, burda_departures, is_comparable, load_records, protocol_of, table1_cells
from iwae.lab.reports.render import Report, build_report, write_report
from iwae.lab.reports.tables import Table, estimators_table, not_comparable_table, orderings, table1, table2

__all__ = [
    "PUBLISHED_RAINFORTH",
    "PUBLISHED_TABLE1",
    "PUBLISHED_TABLE2",
    "Report",
    "RunRecord",
    "Table",
    "build_report",
    "burda_departures",
    "estimators_table",
    "is_comparable",
    "load_records",
    "not_comparable_table",
    "orderings",
    "protocol_of",
    "table1",
    "table1_cells",
    "table2",
    "write_report",
]
