"""The input file of a bulk job: JSON Lines (or one JSON array) of documents, their ids, and the
bad lines, each with a stable code (`LineCode`).

The file is read as bytes and split on `\\n` only, so a line that is not UTF-8 costs only itself
(and U+2028 inside a JSON string is no line break). Whatever a line holds (nesting deeper than
the parser's recursion limit, an integer of more digits than Python converts, a lone surrogate,
a wrong type), it becomes one entry of `InputFile.errors`; nothing here raises for the content.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

DocumentId = str | int

BOM = b"\xef\xbb\xbf"
MAX_ID_CHARS = 256
MAX_ID_INT = 2**63 - 1


class LineCode(str, Enum):
    """Why an input line was refused; stable strings (the request checks of `validate.py` add the
    worker's own codes, `invalid_request` and `too_long`)."""

    INVALID_UTF8 = "invalid_utf8"  # the line's bytes are not UTF-8
    INVALID_JSON = "invalid_json"  # not JSON, nested too deep, or a number Python cannot convert
    INVALID_DOCUMENT = "invalid_document"  # not a string nor an object with a string `text`
    INVALID_TEXT = "invalid_text"  # a text that is not valid Unicode (a lone surrogate escape)
    EMPTY_DOCUMENT = "empty_document"  # a text of white space only
    INVALID_ID = "invalid_id"  # an id that is not a string (1-256 characters) or a 64-bit integer
    DUPLICATE_ID = "duplicate_id"  # an id an earlier line has


@dataclass
class InputFile:
    """A documents file: the good lines' documents, ids and line numbers, and the bad lines
    (`{"line": 1-based, "code": LineCode value, "reason": text}`)."""

    documents: list[str] = field(default_factory=list)
    ids: list[DocumentId] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)

    def refuse(self, line: int, code: str, reason: str) -> None:
        self.errors.append({"line": line, "code": code, "reason": reason})

    def drop(self, positions: set[int]) -> None:
        """Remove the documents at these positions (refused after parsing)."""
        keep = [i for i in range(len(self.documents)) if i not in positions]
        self.documents = [self.documents[i] for i in keep]
        self.ids = [self.ids[i] for i in keep]
        self.lines = [self.lines[i] for i in keep]


def _loads(text: str) -> tuple[Any, str | None]:
    """json.loads, or the reason it failed (never raises for the content)."""
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"{exc.msg} (column {exc.colno})"
    except RecursionError:
        return None, "nested too deep"
    except ValueError as exc:  # an integer over Python's int-string digit limit
        return None, str(exc).split(";")[0][:200]


def unicode_problem(text: str) -> str | None:
    """Why `text` cannot be sent as UTF-8 (a lone surrogate), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"not valid Unicode: a lone surrogate at character {exc.start}"
    return None


def id_problem(doc_id: Any) -> str | None:
    """Why `doc_id` cannot name a document, else None."""
    if isinstance(doc_id, bool) or not isinstance(doc_id, str | int):
        return '"id" must be a string or an integer'
    if isinstance(doc_id, int):
        return None if -MAX_ID_INT <= doc_id <= MAX_ID_INT else '"id" must fit a 64-bit integer'
    if not 1 <= len(doc_id) <= MAX_ID_CHARS:
        return f'"id" must be 1 to {MAX_ID_CHARS} characters'
    return unicode_problem(doc_id)


def _items(raw: bytes, out: InputFile) -> list[tuple[int, Any]]:
    """The file's JSON values with their line numbers (item numbers for one JSON array)."""
    if raw.startswith(BOM):
        raw = raw[len(BOM):]
    if raw.lstrip().startswith(b"["):
        try:
            whole, _ = _loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            whole = None
        if isinstance(whole, list):
            return list(enumerate(whole, 1))
    items: list[tuple[int, Any]] = []
    for n, line in enumerate(raw.split(b"\n"), 1):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            out.refuse(n, LineCode.INVALID_UTF8.value, f"not UTF-8 (byte {exc.start + 1})")
            continue
        value, error = _loads(text)
        if error is not None:
            out.refuse(n, LineCode.INVALID_JSON.value, f"invalid JSON: {error}")
            continue
        items.append((n, value))
    return items


def parse_documents(raw: bytes | str) -> InputFile:
    """JSON Lines (or one JSON array) of strings or {"text": ..., "id": ...} objects.

    A bad line is reported with its line number (its item number in an array) and a `LineCode`;
    the other lines are kept. Blank lines are skipped; a leading UTF-8 BOM is ignored. A document's
    id defaults to its line number. Other keys of an object are ignored.
    """
    out = InputFile()
    data = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
    seen: dict[DocumentId, int] = {}
    for n, item in _items(data, out):
        doc_id: Any = n
        if isinstance(item, dict):
            text = item.get("text")
            if "id" in item:
                doc_id = item["id"]
        else:
            text = item
        if not isinstance(text, str):
            reason = 'expected a string or an object with a string "text"'
            out.refuse(n, LineCode.INVALID_DOCUMENT.value, reason)
            continue
        if not text.strip():
            out.refuse(n, LineCode.EMPTY_DOCUMENT.value, "empty document")
            continue
        problem = unicode_problem(text)
        if problem is not None:
            out.refuse(n, LineCode.INVALID_TEXT.value, f"text {problem}")
            continue
        problem = id_problem(doc_id)
        if problem is not None:
            out.refuse(n, LineCode.INVALID_ID.value, problem)
            continue
        if doc_id in seen:
            shown = repr(doc_id) if len(str(doc_id)) <= 40 else repr(doc_id)[:40] + "..."
            out.refuse(n, LineCode.DUPLICATE_ID.value, f"duplicate id {shown} (first on line {seen[doc_id]})")
            continue
        seen[doc_id] = n
        out.documents.append(text)
        out.ids.append(doc_id)
        out.lines.append(n)
    out.errors.sort(key=lambda e: e["line"])
    return out


def read_documents(path: str) -> InputFile:
    """parse_documents of a file ('-' = stdin); OSError if it cannot be read."""
    return parse_documents(sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes())
