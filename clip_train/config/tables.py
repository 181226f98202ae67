"""Content checks of --train_file / --validation_file, up front: the file parses, with the named columns.

Read once, line by line, before anything is loaded; a problem comes back as a short phrase naming the line
(validate.py turns it into the one error line). datasets' own parsers would fail later, with a traceback.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from typing import Any


def table_file(v: Any, a: Any) -> str | None:
    """An existing .csv / .json / .jsonl file that parses, with --image_column and --caption_column."""
    if v is None:
        return None
    ext = v.rsplit(".", 1)[-1].lower() if "." in os.path.basename(v) else ""
    if ext not in ("csv", "json", "jsonl"):
        return f"has the extension {'.' + ext if ext else '(none)'}"
    if not os.path.isfile(v):
        return "no such file" if not os.path.exists(v) else "is a folder, not a file"
    columns = [c for c in (a.image_column, a.caption_column) if c]
    try:
        return _csv_problem(v, columns) if ext == "csv" else _json_problem(v, columns)
    except UnicodeDecodeError as e:
        return f"is not UTF-8 text (byte {e.start})"


def _csv_problem(path: str, columns: Sequence[str]) -> str | None:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if not header:
            return "is empty (expected a header line naming the columns)"
        missing = [c for c in columns if c not in header]
        if missing:
            return f"has no column {', '.join(missing)} (header: {', '.join(header)}); set --image_column / --caption_column"
        try:
            for row in reader:
                if row and len(row) != len(header):
                    return f"line {reader.line_num} has {len(row)} fields, the header has {len(header)}"
        except csv.Error as e:
            return f"line {reader.line_num} is not valid CSV ({e})"
    return None


def _json_problem(path: str, columns: Sequence[str]) -> str | None:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        return "is empty"
    if text.lstrip().startswith("["):  # one JSON array of objects, which datasets also reads
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            return f"line {e.lineno} is not valid JSON ({e.msg})"
        return _rows_problem(((i + 1, r) for i, r in enumerate(rows)), columns, "row")
    numbered = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                numbered.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                return f"line {n} is not valid JSON ({e.msg})"
    return _rows_problem(numbered, columns, "line")


def _rows_problem(rows: Any, columns: Sequence[str], unit: str) -> str | None:
    for n, row in rows:
        if not isinstance(row, dict):
            return f"{unit} {n} is not a JSON object"
        missing = [c for c in columns if c not in row]
        if missing:
            return f"{unit} {n} has no {', '.join(missing)} (it has {', '.join(row) or 'nothing'}); set --image_column / --caption_column"
    return None
