"""CSV cells that spreadsheets will not run as formulas (OWASP "CSV injection").

Reader names, comments, prompts and paths end up in exports that admins open in Excel or
LibreOffice; a cell starting with `= + - @`, a tab or a carriage return may be evaluated there
(e.g. `=HYPERLINK(...)` sending data away). Such text cells get a leading `'`, which spreadsheets
show as plain text. Numbers are left alone (a negative kappa stays a number).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Sequence
from typing import Any

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def safe_cell(value: Any) -> Any:
    """'' for None, `'`-prefixed text for formula-like strings, anything else unchanged."""
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def csv_text(rows: Iterable[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as CSV text (header first), every cell passed through `safe_cell`."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: safe_cell(row.get(k)) for k in columns})
    return buf.getvalue()
