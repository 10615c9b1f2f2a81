"""The input file of a bulk job: JSON Lines (or one JSON array) of documents, their ids,
and the bad lines (reported with their line number and skipped)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DocumentId = str | int


@dataclass
class InputFile:
    """A documents file: the good lines' documents and ids, and the bad lines (1-based `line`, `reason`)."""

    documents: list[str] = field(default_factory=list)
    ids: list[DocumentId] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)


def parse_documents(raw: str) -> InputFile:
    """JSON Lines (or one JSON array) of strings or {"text": ..., "id": ...} objects.

    A bad line (invalid JSON, no string `text`, an empty text, an id that is not a string or
    integer, a repeated id) is reported with its line number (its item number in an array)
    and skipped; the other lines are kept. A document's id defaults to its line number.
    """
    out = InputFile()
    items: list[tuple[int, Any]] = []
    if raw.lstrip().startswith("["):
        try:
            array = json.loads(raw)
        except json.JSONDecodeError as exc:
            out.errors.append({"line": exc.lineno, "reason": f"invalid JSON array: {exc.msg}"})
            return out
        items = list(enumerate(array, 1))
    else:
        for n, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append((n, json.loads(line)))
            except json.JSONDecodeError as exc:
                out.errors.append({"line": n, "reason": f"invalid JSON: {exc.msg} (column {exc.colno})"})
    seen: dict[DocumentId, int] = {}
    for n, item in items:
        doc_id: Any = n
        if isinstance(item, dict):
            text = item.get("text")
            if "id" in item:
                doc_id = item["id"]
        else:
            text = item
        if not isinstance(text, str):
            out.errors.append({"line": n, "reason": 'expected a string or an object with a string "text"'})
            continue
        if not text.strip():
            out.errors.append({"line": n, "reason": "empty document"})
            continue
        if isinstance(doc_id, bool) or not isinstance(doc_id, str | int):
            out.errors.append({"line": n, "reason": '"id" must be a string or an integer'})
            continue
        if doc_id in seen:
            reason = f"duplicate id {doc_id!r} (first on line {seen[doc_id]})"
            out.errors.append({"line": n, "reason": reason})
            continue
        seen[doc_id] = n
        out.documents.append(text)
        out.ids.append(doc_id)
    out.errors.sort(key=lambda e: e["line"])
    return out


def read_documents(path: str) -> InputFile:
    """parse_documents of a file ('-' = stdin)."""
    return parse_documents(sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8"))
