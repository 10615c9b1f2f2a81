"""CPU comparison of the two grammar engines for structured output: llguidance and xgrammar.

Both turn a JSON schema, "any JSON object" or a regex into a per-step token mask. This script measures,
with the default model's tokenizer (SmolLM2, loaded from the local model directory, never a hub):

- import time of each library and the time to build its tokenizer index (once per worker);
- cold compile time of each grammar (no cache: xgrammar's compiler cache is off, llguidance has none);
- the per-token cost of a decode step: fill one sequence's row of an int32 bitmask, then advance the matcher
  by the next token of a known-valid output (the JSON text of a hand-written instance), checking on the way
  that every token of the valid output was allowed by the mask, and that the grammar accepts at its end;
- whether each library enforces the schema: a hand-written instance that breaks one keyword (a too-long
  string, a number out of range, a missing required field ...) must be refused somewhere along its tokens;
- which schemas, keywords and regexes each rejects at compile time, with its message;
- hostile inputs (100-level nesting, an enum of 20,000 strings, catastrophic or exploding regexes, huge
  repetition counts, unsupported or broken schemas): compile time, first-mask time, or the error.

Each library runs in its own child process (clean import times and memory numbers, and a native call that
never returns can be killed); each hostile input runs in a child of its own with `--hostile-timeout`.
The machine is shared and small, so the absolute numbers are noisy; both libraries run single-threaded
(xgrammar's compiler with max_threads=1) on the same inputs, one after the other.

  .venv/bin/python loadtest/grammar_bench.py --json-out docs/bench/cpu_grammar_libs.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

LIBS = ("llguidance", "xgrammar")

# ---------------------------------------------------------------------------------------------------------
# The grammars. Each case: name, kind ("json_schema" | "json_object" | "regex"), the schema or regex, a
# valid output and (when one makes sense) an output that breaks the schema in one keyword. For json cases
# the outputs are Python values, serialised with json.dumps' default separators (what models tend to write).
# ---------------------------------------------------------------------------------------------------------

_PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}

CASES: list[tuple[str, str, Any, Any, Any]] = [
    ("flat_required", "json_schema", _PERSON, {"name": "Ada Lovelace", "age": 36}, {"name": "Ada"}),
    (
        "nested_objects",
        "json_schema",
        {
            "type": "object",
            "properties": {
                "user": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "address": {
                            "type": "object",
                            "properties": {
                                "street": {"type": "string"},
                                "city": {"type": "string"},
                                "country": {"type": "string"},
                            },
                            "required": ["street", "city", "country"],
                        },
                    },
                    "required": ["name", "address"],
                }
            },
            "required": ["user"],
        },
        {"user": {"name": "Grace", "address": {"street": "1 Main St", "city": "Arlington", "country": "US"}}},
        {"user": {"name": "Grace", "address": {"street": "1 Main St", "city": "Arlington"}}},
    ),
    (
        "array_of_ints_min_max_items",
        "json_schema",
        {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 12},
        [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5],
        [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13],
    ),
    (
        "array_of_objects",
        "json_schema",
        {
            "type": "object",
            "properties": {
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                        "required": ["sku", "qty"],
                    },
                }
            },
            "required": ["items"],
        },
        {
            "items": [{"sku": f"{c}-{i * 37}", "qty": i} for i, c in enumerate("ABCDEFGHIJ", start=1)]
        },  # ~110 tokens
        {"items": [{"sku": "A-1", "qty": "two"}]},
    ),
    (
        "enum_strings",
        "json_schema",
        {
            "type": "object",
            "properties": {"color": {"enum": ["red", "green", "blue", "cyan", "magenta", "yellow"]}},
            "required": ["color"],
        },
        {"color": "magenta"},
        {"color": "purple"},
    ),
    (
        "const",
        "json_schema",
        {
            "type": "object",
            "properties": {"version": {"const": "v2"}, "ok": {"type": "boolean"}},
            "required": ["version", "ok"],
        },
        {"version": "v2", "ok": True},
        {"version": "v3", "ok": True},
    ),
    (
        "integer_min_max",
        "json_schema",
        {
            "type": "object",
            "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}},
            "required": ["age"],
        },
        {"age": 42},
        {"age": 150},
    ),
    (
        "number_exclusive_bounds",
        "json_schema",
        {
            "type": "object",
            "properties": {"p": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}},
            "required": ["p"],
        },
        {"p": 0.25},
        {"p": 1.5},
    ),
    (
        "string_lengths",
        "json_schema",
        {
            "type": "object",
            "properties": {"code": {"type": "string", "minLength": 3, "maxLength": 8}},
            "required": ["code"],
        },
        {"code": "abcde"},
        {"code": "abcdefghijk"},
    ),
    (
        "string_pattern",
        "json_schema",
        {
            "type": "object",
            "properties": {"id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}},
            "required": ["id"],
        },
        {"id": "ABC-1234"},
        {"id": "abc-12"},
    ),
    (
        "string_formats",
        "json_schema",
        {
            "type": "object",
            "properties": {
                "when": {"type": "string", "format": "date-time"},
                "email": {"type": "string", "format": "email"},
                "id": {"type": "string", "format": "uuid"},
            },
            "required": ["when", "email", "id"],
        },
        {
            "when": "2024-05-01T12:30:00Z",
            "email": "ada@example.com",
            "id": "123e4567-e89b-12d3-a456-426614174000",
        },
        {"when": "yesterday", "email": "ada@example.com", "id": "123e4567-e89b-12d3-a456-426614174000"},
    ),
    (
        "anyOf_scalar",
        "json_schema",
        {
            "type": "object",
            "properties": {"value": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
            "required": ["value"],
        },
        {"value": 17},
        {"value": [1]},
    ),
    (
        "anyOf_objects",
        "json_schema",
        {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {"kind": {"const": "circle"}, "r": {"type": "number"}},
                    "required": ["kind", "r"],
                },
                {
                    "type": "object",
                    "properties": {
                        "kind": {"const": "rect"},
                        "w": {"type": "number"},
                        "h": {"type": "number"},
                    },
                    "required": ["kind", "w", "h"],
                },
            ]
        },
        {"kind": "rect", "w": 2.5, "h": 4},
        {"kind": "rect", "r": 1},
    ),
    (
        "oneOf",
        "json_schema",
        {
            "type": "object",
            "properties": {"v": {"oneOf": [{"type": "boolean"}, {"type": "null"}]}},
            "required": ["v"],
        },
        {"v": None},
        {"v": 0},
    ),
    (
        "allOf",
        "json_schema",
        {
            "allOf": [
                {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]},
            ]
        },
        {"a": 1, "b": "x"},
        {"a": 1},
    ),
    (
        "ref_defs",
        "json_schema",
        {
            "$defs": {
                "point": {
                    "type": "object",
                    "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                    "required": ["x", "y"],
                }
            },
            "type": "object",
            "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
            "required": ["from", "to"],
        },
        {"from": {"x": 0, "y": 1.5}, "to": {"x": -2, "y": 3}},
        {"from": {"x": 0}, "to": {"x": -2, "y": 3}},
    ),
    (
        "recursive_ref",
        "json_schema",
        {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                    },
                    "required": ["name", "children"],
                }
            },
            "$ref": "#/$defs/node",
        },
        {"name": "root", "children": [{"name": "a", "children": []}, {"name": "b", "children": []}]},
        {"name": "root", "children": [{"name": "a"}]},
    ),
    (
        "additional_properties_typed",
        "json_schema",
        {"type": "object", "additionalProperties": {"type": "integer"}},
        {"apples": 3, "pears": 5, "plums": 0},
        {"apples": "three"},
    ),
    (
        "additional_properties_false_optional",
        "json_schema",
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}, "c": {"type": "integer"}},
            "additionalProperties": False,
        },
        {"a": 1, "c": 3},
        {"a": 1, "d": 4},
    ),
    (
        "nullable_and_scalars",
        "json_schema",
        {
            "type": "object",
            "properties": {
                "nick": {"type": ["string", "null"]},
                "active": {"type": "boolean"},
                "score": {"type": "number"},
            },
            "required": ["nick", "active", "score"],
        },
        {"nick": None, "active": False, "score": -3.25},
        {"nick": 5, "active": False, "score": -3.25},
    ),
    (
        "prefix_items_tuple",
        "json_schema",
        {
            "type": "array",
            "prefixItems": [{"type": "string"}, {"type": "integer"}, {"type": "boolean"}],
            "items": False,
        },
        ["a", 1, True],
        ["a", "b", True],
    ),
    (
        "openai_strict_tool_args",
        "json_schema",
        {
            "type": "object",
            "properties": {
                "location": {"type": "string"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "array", "items": {"type": "string", "enum": ["mon", "tue", "wed", "thu"]}},
            },
            "required": ["location", "unit", "days"],
            "additionalProperties": False,
        },
        {"location": "Paris, France", "unit": "celsius", "days": ["mon", "wed"]},
        {"location": "Paris, France", "unit": "kelvin", "days": ["mon"]},
    ),
    (
        "multipleOf",
        "json_schema",
        {"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 5}}, "required": ["n"]},
        {"n": 35},
        {"n": 36},
    ),
    (
        "min_max_properties",
        "json_schema",
        {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "minProperties": 1,
            "maxProperties": 2,
        },
        {"k1": "v1", "k2": "v2"},
        {"k1": "v1", "k2": "v2", "k3": "v3"},
    ),
    (
        "pattern_properties",
        "json_schema",
        {
            "type": "object",
            "patternProperties": {"^x-[a-z]+$": {"type": "integer"}},
            "additionalProperties": False,
        },
        {"x-one": 1, "x-two": 2},
        {"y-one": 1},
    ),
    (
        "uniqueItems",
        "json_schema",
        {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
        [1, 2, 3],
        [1, 1],
    ),
    (
        "if_then_else",
        "json_schema",
        {
            "type": "object",
            "properties": {"kind": {"type": "string"}, "n": {"type": "integer"}},
            "if": {"properties": {"kind": {"const": "num"}}},
            "then": {"required": ["n"]},
        },
        {"kind": "num", "n": 1},
        {"kind": "num"},
    ),
    (
        "not",
        "json_schema",
        {"type": "object", "not": {"required": ["forbidden"]}},
        {"ok": 1},
        {"forbidden": 1},
    ),
    (
        "contains",
        "json_schema",
        {"type": "array", "items": {"type": "integer"}, "contains": {"const": 7}},
        [1, 7, 3],
        [1, 2, 3],
    ),
    (
        "dependentRequired",
        "json_schema",
        {
            "type": "object",
            "properties": {"card": {"type": "string"}, "billing": {"type": "string"}},
            "dependentRequired": {"card": ["billing"]},
        },
        {"card": "4111", "billing": "x"},
        {"card": "4111"},
    ),
    (
        "json_object",
        "json_object",
        None,
        {
            "title": "Quarterly report",
            "tags": ["finance", "q3", "draft"],
            "meta": {"pages": 31, "draft": False, "owner": None, "ratio": -0.125, "note": 'see "annex"'},
            "rows": [[1, 2.5, "x"], [3, 4e-3, "y"], {"nested": {"deep": [True, None]}}],
        },  # ~100 tokens
        [1, 2],
    ),
    ("regex_phone", "regex", r"\(\d{3}\) \d{3}-\d{4}", "(555) 123-4567", "555-123-4567"),
    ("regex_iso_date", "regex", r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])", "2024-02-29", "2024-13-01"),
    (
        "regex_email_like",
        "regex",
        r"[a-z]{1,16}@[a-z]{1,16}\.(com|org|net)",
        "ada@example.org",
        "ada@example.io",
    ),
]


def _enum_strings(n: int) -> list[str]:
    rng = random.Random(0)
    return [f"{''.join(rng.choices(string.ascii_lowercase, k=6))}-{i}" for i in range(n)]


def _deep_object(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        node = {"type": "object", "properties": {"a": node}, "required": ["a"]}
    return node


def _deep_array(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        node = {"type": "array", "items": node, "minItems": 1}
    return node


HOSTILE: list[tuple[str, str, Any]] = [
    ("deep_object_100", "json_schema", _deep_object(100)),
    ("deep_array_100", "json_schema", _deep_array(100)),
    ("enum_20000_strings", "json_schema", {"enum": _enum_strings(20_000)}),
    (
        "anyOf_1000_objects",
        "json_schema",
        {
            "anyOf": [
                {"type": "object", "properties": {f"k{i}": {"type": "integer"}}, "required": [f"k{i}"]}
                for i in range(1000)
            ]
        },
    ),
    ("string_length_10k_20k", "json_schema", {"type": "string", "minLength": 10_000, "maxLength": 20_000}),
    (
        "array_min_items_5000",
        "json_schema",
        {"type": "array", "items": {"type": "integer"}, "minItems": 5000},
    ),
    ("pattern_nested_counters", "json_schema", {"type": "string", "pattern": "^((a{1,20}){1,20}){1,20}$"}),
    ("regex_catastrophic", "regex", r"(a+)+$"),
    ("regex_alternation_star", "regex", r"(a|aa)*b"),
    ("regex_nested_counters", "regex", r"(([a-z]{1,50}){1,50}){1,50}"),
    ("regex_lookahead_unsupported", "regex", r"(?=.*\d)[a-z0-9]{8}"),
    ("regex_backreference_unsupported", "regex", r"(a)\1"),
    ("regex_invalid", "regex", r"(unclosed"),
    ("schema_unknown_type", "json_schema", {"type": "nonsense"}),
    ("schema_dangling_ref", "json_schema", {"$ref": "#/$defs/missing"}),
    ("schema_unsatisfiable", "json_schema", {"type": "integer", "minimum": 10, "maximum": 1}),
]

# ---------------------------------------------------------------------------------------------------------
# One adapter per library, each written the way its documentation shows.
# ---------------------------------------------------------------------------------------------------------


class _LLGuidance:
    name = "llguidance"

    def __init__(self) -> None:
        t0 = time.perf_counter()
        import llguidance
        import llguidance.hf

        self.import_s = time.perf_counter() - t0
        self.llg = llguidance
        self.llg_hf = llguidance.hf

    def build_tokenizer(self, hf_tokenizer: Any, vocab_size: int) -> None:
        self.tok = self.llg_hf.from_tokenizer(hf_tokenizer, n_vocab=vocab_size)

    def compile(self, kind: str, payload: Any) -> Any:
        llg = self.llg
        if kind == "regex":
            # As worker/engine/structured does: a Lark rule with ASCII \d and \w.
            grammar = llg.LLMatcher.grammar_from_lark(f"start: /{llg.regex_to_lark(payload, 'dw')}/")
        elif kind == "json_object":
            grammar = llg.LLMatcher.grammar_from_json_schema({"type": "object"})
        else:
            grammar = llg.LLMatcher.grammar_from_json_schema(payload)
        # The constructor is the compile (it drops the GIL); it never raises for grammar errors.
        matcher = llg.LLMatcher(self.tok, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def new_matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def fill(self, matcher: Any, bitmask: Any, row: int) -> None:
        view = bitmask[row]
        matcher.unsafe_compute_mask_ptr(view.data_ptr(), view.numel() * 4)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))

    def accepting(self, matcher: Any) -> bool:
        return bool(matcher.is_accepting())

    def memory_bytes(self, compiled: Any) -> int | None:
        return None

    def error(self, matcher: Any) -> str:
        return str(matcher.get_error())


class _XGrammar:
    name = "xgrammar"

    def __init__(self) -> None:
        t0 = time.perf_counter()
        import xgrammar

        self.import_s = time.perf_counter() - t0
        self.xgr = xgrammar

    def build_tokenizer(self, hf_tokenizer: Any, vocab_size: int) -> None:
        self.info = self.xgr.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab_size)
        # No cache: every compile below is cold. One thread, like llguidance's compile.
        self.compiler = self.xgr.GrammarCompiler(self.info, max_threads=1, cache_enabled=False)

    def compile(self, kind: str, payload: Any) -> Any:
        if kind == "regex":
            return self.compiler.compile_regex(payload)
        if kind == "json_object":
            # strict_mode=False: an object with any properties (strict mode would allow only {}).
            return self.compiler.compile_json_schema({"type": "object"}, strict_mode=False)
        return self.compiler.compile_json_schema(payload)

    def new_matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher: Any, bitmask: Any, row: int) -> None:
        matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))

    def accepting(self, matcher: Any) -> bool:
        return bool(matcher.is_completed())

    def memory_bytes(self, compiled: Any) -> int | None:
        return int(compiled.memory_size_bytes)

    def error(self, matcher: Any) -> str:
        return "token rejected"


ADAPTERS: dict[str, Callable[[], Any]] = {"llguidance": _LLGuidance, "xgrammar": _XGrammar}


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _text(kind: str, value: Any) -> str:
    return value if kind == "regex" else json.dumps(value)


def _allowed(bitmask: Any, row: int, token: int) -> bool:
    return bool((int(bitmask[row, token // 32]) >> (token % 32)) & 1)


def _walk(lib: Any, matcher: Any, bitmask: Any, tokens: list[int], eos: int) -> dict[str, Any]:
    """Fill, check and accept each token of an output; the timings of the valid walk are the step costs."""
    fill_us: list[float] = []
    accept_us: list[float] = []
    for i, token in enumerate(tokens):
        t0 = time.perf_counter()
        lib.fill(matcher, bitmask, 0)
        t1 = time.perf_counter()
        allowed = _allowed(bitmask, 0, token)
        t2 = time.perf_counter()
        accepted = lib.accept(matcher, token) if allowed else False
        t3 = time.perf_counter()
        fill_us.append((t1 - t0) * 1e6)
        accept_us.append((t3 - t2) * 1e6)
        if not (allowed and accepted):
            return {"refused_at": i, "allowed_by_mask": allowed, "fill_us": fill_us, "accept_us": accept_us}
    lib.fill(matcher, bitmask, 0)
    return {
        "refused_at": None,
        "accepting": lib.accepting(matcher),
        "eos_allowed": _allowed(bitmask, 0, eos),
        "fill_us": fill_us,
        "accept_us": accept_us,
    }


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _load_tokenizer(model_dir: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _model_vocab_size(model_dir: str) -> int:
    return int(json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"])


def child_cases(lib_name: str, model_dir: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    hf_tok = _load_tokenizer(model_dir)
    rss_start = _rss_mib()
    lib = ADAPTERS[lib_name]()
    rss_import = _rss_mib()
    vocab = _model_vocab_size(model_dir)
    t0 = time.perf_counter()
    lib.build_tokenizer(hf_tok, vocab)
    tokenizer_s = time.perf_counter() - t0
    rss_tok = _rss_mib()
    bitmask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)
    results: list[dict[str, Any]] = []
    all_fill: list[float] = []
    all_accept: list[float] = []
    for name, kind, payload, valid, invalid in CASES:
        row: dict[str, Any] = {"name": name, "kind": kind}
        t0 = time.perf_counter()
        try:
            compiled = lib.compile(kind, payload)
        except Exception as exc:  # noqa: BLE001 - any compile failure is a result to record
            row.update(compile_ms=(time.perf_counter() - t0) * 1e3, error=str(exc)[:300])
            results.append(row)
            continue
        row["compile_ms"] = (time.perf_counter() - t0) * 1e3
        row["memory_bytes"] = lib.memory_bytes(compiled)
        t0 = time.perf_counter()
        matcher = lib.new_matcher(compiled)
        row["new_matcher_us"] = (time.perf_counter() - t0) * 1e6
        tokens = hf_tok.encode(_text(kind, valid), add_special_tokens=False)
        walk = _walk(lib, matcher, bitmask, tokens, hf_tok.eos_token_id)
        fills, accepts = walk.pop("fill_us"), walk.pop("accept_us")
        row.update(
            tokens=len(tokens),
            first_fill_us=fills[0],
            fill_us_mean=statistics.fmean(fills[1:] or fills),
            fill_us_max=max(fills),
            accept_us_mean=statistics.fmean(accepts),
            valid_ok=walk["refused_at"] is None and walk.get("accepting", False),
            valid_walk=walk,
        )
        all_fill += fills[1:]
        all_accept += accepts
        if invalid is not None:
            bad = hf_tok.encode(_text(kind, invalid), add_special_tokens=False)
            bad_walk = _walk(lib, lib.new_matcher(compiled), bitmask, bad, hf_tok.eos_token_id)
            bad_walk.pop("fill_us")
            bad_walk.pop("accept_us")
            row["invalid_rejected"] = bad_walk["refused_at"] is not None or not bad_walk.get("accepting")
        results.append(row)
    return {
        "lib": lib_name,
        "version": metadata.version(lib_name),
        "rejected_at_compile": [c["name"] for c in results if "error" in c],
        "valid_output_refused": [c["name"] for c in results if "error" not in c and not c["valid_ok"]],
        "invalid_output_accepted": [c["name"] for c in results if c.get("invalid_rejected") is False],
        "import_s": lib.import_s,
        "tokenizer_build_s": tokenizer_s,
        "rss_mib": {
            "after_hf_tokenizer": rss_start,
            "after_import": rss_import,
            "after_tokenizer_index": rss_tok,
            "after_all_cases": _rss_mib(),
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        },
        "fill_us": {
            "mean": statistics.fmean(all_fill),
            "p50": _pct(all_fill, 0.5),
            "p99": _pct(all_fill, 0.99),
            "max": max(all_fill),
            "n": len(all_fill),
        },
        "accept_us_mean": statistics.fmean(all_accept),
        "cases": results,
    }


def child_hostile(lib_name: str, model_dir: str, case: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    name, kind, payload = next(c for c in HOSTILE if c[0] == case)
    lib = ADAPTERS[lib_name]()
    vocab = _model_vocab_size(model_dir)
    lib.build_tokenizer(_load_tokenizer(model_dir), vocab)
    row: dict[str, Any] = {"name": name, "kind": kind}
    t0 = time.perf_counter()
    try:
        compiled = lib.compile(kind, payload)
    except Exception as exc:  # noqa: BLE001 - the error is the result
        row.update(compile_ms=(time.perf_counter() - t0) * 1e3, error=str(exc)[:300])
        return row
    row["compile_ms"] = (time.perf_counter() - t0) * 1e3
    row["memory_bytes"] = lib.memory_bytes(compiled)
    matcher = lib.new_matcher(compiled)
    bitmask = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)
    t0 = time.perf_counter()
    lib.fill(matcher, bitmask, 0)
    row["first_fill_ms"] = (time.perf_counter() - t0) * 1e3
    row["allowed_first_tokens"] = int(sum(bin(int(w) & 0xFFFFFFFF).count("1") for w in bitmask[0]))
    return row


def _dist_bytes(dist: str) -> int:
    files = metadata.distribution(dist).files or []
    return sum(f.size or 0 for f in files)


def _requires(dist: str) -> list[str]:
    return [r for r in metadata.requires(dist) or [] if "extra ==" not in r]


def _run_child(args: list[str], timeout_s: float) -> tuple[dict[str, Any] | None, str]:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        cmd = [sys.executable, __file__, *args, "--child-out", out.name]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None, f"timeout > {timeout_s:.0f} s (child killed)"
        if proc.returncode != 0:
            return None, f"child exited {proc.returncode}: {proc.stderr.strip()[-300:]}"
        return json.loads(Path(out.name).read_text()), ""


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def print_report(report: dict[str, Any]) -> None:
    libs = report["libs"]
    print("\n== setup (per worker) ==")
    print(f"{'':26}" + "".join(f"{n:>16}" for n in libs))
    for label, get in (
        ("version", lambda r: r["version"]),
        ("import s", lambda r: _fmt(r["import_s"], ".3f")),
        ("tokenizer index s", lambda r: _fmt(r["tokenizer_build_s"], ".3f")),
        (
            "RSS +MiB import+index",
            lambda r: _fmt(r["rss_mib"]["after_tokenizer_index"] - r["rss_mib"]["after_hf_tokenizer"]),
        ),
        (
            "RSS +MiB after all cases",
            lambda r: _fmt(r["rss_mib"]["after_all_cases"] - r["rss_mib"]["after_hf_tokenizer"]),
        ),
        ("fill us mean", lambda r: _fmt(r["fill_us"]["mean"])),
        ("fill us p50", lambda r: _fmt(r["fill_us"]["p50"])),
        ("fill us p99", lambda r: _fmt(r["fill_us"]["p99"])),
        ("fill us max", lambda r: _fmt(r["fill_us"]["max"])),
        ("accept us mean", lambda r: _fmt(r["accept_us_mean"])),
        (
            "valid outputs accepted",
            lambda r: f"{sum(bool(c.get('valid_ok')) for c in r['cases'])}/{len(r['cases'])}",
        ),
        (
            "invalid outputs refused",
            lambda r: (
                f"{sum(bool(c.get('invalid_rejected')) for c in r['cases'])}/"
                f"{sum('invalid_rejected' in c for c in r['cases'])}"
            ),
        ),
    ):
        print(f"{label:26}" + "".join(f"{get(libs[n]):>16}" for n in libs))
    print("\n== per grammar: cold compile ms / first fill us / mean fill us / valid ok / invalid refused ==")
    names = [c[0] for c in CASES]
    print(f"{'case':38}" + "".join(f"{n:>40}" for n in libs))
    for i, name in enumerate(names):
        cells = []
        for n in libs:
            c = libs[n]["cases"][i]
            if "error" in c:
                cells.append(f"REJECTED ({c['compile_ms']:.1f} ms)")
            else:
                cells.append(
                    f"{c['compile_ms']:.1f} / {c['first_fill_us']:.0f} / {c['fill_us_mean']:.0f} / "
                    f"{'y' if c['valid_ok'] else 'N'} / {'y' if c.get('invalid_rejected') else 'n'}"
                )
        print(f"{name:38}" + "".join(f"{cell:>40}" for cell in cells))
    print("\n== hostile inputs: compile ms, first fill ms, or error ==")
    print(f"{'case':34}" + "".join(f"{n:>44}" for n in libs))
    for name, _, _ in HOSTILE:
        cells = []
        for n in libs:
            h = report["hostile"][n].get(name)
            if h is None:
                cells.append("not run")
            elif "error" in h:
                cells.append(f"error {_fmt(h.get('compile_ms'))} ms")
            else:
                cells.append(f"{h['compile_ms']:.0f} ms / fill {h['first_fill_ms']:.1f} ms")
        print(f"{name:34}" + "".join(f"{cell:>44}" for cell in cells))
    print("\n== correctness ==")
    for n in libs:
        for key in ("rejected_at_compile", "valid_output_refused", "invalid_output_accepted"):
            print(f"{n:11} {key:24} {', '.join(libs[n][key]) or '-'}")
    print("\n== errors (first 120 chars) ==")
    for n in libs:
        for c in libs[n]["cases"]:
            if "error" in c:
                print(f"{n:11} {c['name']:30} {c['error'][:120]!r}")
        for name, h in report["hostile"][n].items():
            if "error" in h:
                print(f"{n:11} {name:30} {h['error'][:120]!r}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    default_dir = Path.home() / ".cache" / "llm-stream-serve" / "models" / "SmolLM2-135M-Instruct"
    parser.add_argument(
        "--model-dir", default=str(default_dir), help="local model directory (tokenizer, config)"
    )
    parser.add_argument("--libs", default=",".join(LIBS))
    parser.add_argument(
        "--hostile-timeout", type=float, default=60.0, help="seconds before a child is killed"
    )
    parser.add_argument("--skip-hostile", action="store_true")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--hostile-case", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        if args.hostile_case:
            result = child_hostile(args.child, args.model_dir, args.hostile_case)
        else:
            result = child_cases(args.child, args.model_dir)
        Path(args.child_out).write_text(json.dumps(result))
        return

    libs = [x for x in args.libs.split(",") if x]
    report: dict[str, Any] = {
        "what": "grammar engines for structured output, SmolLM2 tokenizer, CPU, one thread each",
        "host": {"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "model_dir": Path(args.model_dir).name,
        "dependencies": {
            lib: {"requires": _requires(lib), "installed_bytes": _dist_bytes(lib)} for lib in libs
        },
        "libs": {},
        "hostile": {},
    }
    if "xgrammar" in libs:
        report["dependencies"]["xgrammar"]["apache_tvm_ffi_installed_bytes"] = _dist_bytes("apache-tvm-ffi")
    for lib in libs:
        print(f"[{lib}] grammar cases ...", flush=True)
        measured, err = _run_child(["--child", lib, "--model-dir", args.model_dir], timeout_s=1800)
        if measured is None:
            raise SystemExit(f"{lib}: {err}")
        report["libs"][lib] = measured
        report["hostile"][lib] = {}
        if args.skip_hostile:
            continue
        for name, _, _ in HOSTILE:
            print(f"[{lib}] hostile {name} ...", flush=True)
            hostile, err = _run_child(
                ["--child", lib, "--hostile-case", name, "--model-dir", args.model_dir], args.hostile_timeout
            )
            report["hostile"][lib][name] = (
                hostile if hostile is not None else {"name": name, "error": err, "compile_ms": None}
            )
    print_report(report)
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=1) + "\n")
        print(f"\nwrote {args.json_out}")


if __name__ == "__main__":
    main()
