"""Structured output (`worker/engine/structured`): specs, the compiler service, matchers, the bitmask op,
and replies of the real model constrained by it that always parse and validate.

The generation tests run their own small decode loop (one sequence, KV cache, CPU): the mask is filled,
applied to the logits, the token sampled and accepted, as the engine will do per step. The compiler in
those tests is built for a vocabulary 64 ids wider than the tokenizer, and the loop appends 64 logits of
+50 for them (the largest of the row): a model with a padded embedding table, whose padding ids must never
be sampled.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import jsonschema
import llguidance
import llguidance.numpy
import numpy as np
import pytest
import torch

from worker.engine.model_files import LoadedModel
from worker.engine.random_model import load_default_tokenizer
from worker.engine.structured import (
    CompiledGrammar,
    GrammarCompiler,
    GrammarError,
    GrammarSpec,
    allocate_bitmask,
    apply_bitmask_,
    bitmask_width,
    consume_tokens,
    fill_bitmasks,
    parse_response_format,
)

PAD = 64  # padding ids past the tokenizer, as in a model whose embedding table is rounded up

# The decode loop passes `past_key_values`, which transformers 5 renamed `cache` (4.x has no `cache`).
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_default_tokenizer()


@pytest.fixture(scope="module")
def compiler(tokenizer: Any) -> Iterator[GrammarCompiler]:
    with GrammarCompiler(tokenizer, vocab_size=len(tokenizer) + PAD, timeout_s=10.0) as c:
        yield c


def _schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "t", "schema": schema, "strict": True}}


# --- response_format parsing ------------------------------------------------------------------------------


def test_parse_accepted_shapes() -> None:
    assert parse_response_format(None) is None
    assert parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}) == GrammarSpec.json_object()
    spec = parse_response_format(_schema({"type": "object", "properties": {"b": {}, "a": {}}}))
    assert spec is not None and spec.kind == "json_schema" and spec.name == "t" and spec.strict is True
    assert spec.source == '{"type":"object","properties":{"b":{},"a":{}}}'  # compact, order kept
    assert parse_response_format({"type": "regex", "regex": "[0-9]+"}) == GrammarSpec.regex("[0-9]+")


def test_spec_key_ignores_metadata_but_not_property_order() -> None:
    a = parse_response_format(_schema({"properties": {"x": {}, "y": {}}}))
    b = parse_response_format(
        {
            "type": "json_schema",
            "json_schema": {"name": "other", "schema": {"properties": {"x": {}, "y": {}}}},
        }
    )
    c = parse_response_format(_schema({"properties": {"y": {}, "x": {}}}))
    assert a is not None and b is not None and c is not None
    assert a == b and a.key == b.key
    assert a.key != c.key  # the grammar emits properties in schema order: a different output


@pytest.mark.parametrize(
    ("response_format", "message"),
    [
        ([1], "response_format must be an object"),
        ({}, "response_format.type must be one of"),
        ({"type": "xml"}, "got 'xml'"),
        ({"type": "json_object", "extra": 1}, "unknown field(s): extra"),
        ({"type": "json_object", "regex": "a"}, "regex is only allowed with type regex"),
        ({"type": "json_schema"}, "json_schema must be an object"),
        ({"type": "json_schema", "json_schema": {"name": "n"}}, "schema is required"),
        ({"type": "json_schema", "json_schema": {"schema": [1]}}, "schema must be a JSON object"),
        ({"type": "json_schema", "json_schema": {"schema": {"x": float("nan")}}}, "schema is not JSON"),
        (
            {"type": "json_schema", "json_schema": {"schema": {}, "strict": "yes"}},
            "strict must be true or false",
        ),
        ({"type": "json_schema", "json_schema": {"schema": {}, "name": 3}}, "name must be a string"),
        ({"type": "json_schema", "json_schema": {"schema": {}, "colour": 1}}, "unknown field(s): colour"),
        ({"type": "regex"}, "regex must be a non-empty string"),
        ({"type": "regex", "regex": ""}, "regex must be a non-empty string"),
    ],
)
def test_parse_errors_name_the_problem(response_format: Any, message: str) -> None:
    with pytest.raises(GrammarError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_response_format(response_format)


# --- bitmask application ----------------------------------------------------------------------------------


def _bits(allowed: list[list[int]], words: int) -> torch.Tensor:
    mask = np.zeros((len(allowed), words), dtype=np.uint32)
    for row, tokens in enumerate(allowed):
        for t in tokens:
            mask[row, t // 32] |= np.uint32(1 << (t % 32))
    return torch.from_numpy(mask.view(np.int32).copy())


def test_apply_bitmask_masks_exactly_the_disallowed_tokens() -> None:
    vocab = 70  # 3 words; bit 31 of a word (a negative int32) must count like any other
    allowed = [[0, 5, 31, 32, 63, 69], [1, 2], [31, 40, 64]]
    bitmask = _bits(allowed, bitmask_width(vocab))
    logits = torch.randn(3, vocab)
    original = logits.clone()
    apply_bitmask_(logits, bitmask, rows=[0, 2])
    for row in (0, 2):
        finite = torch.isfinite(logits[row]).nonzero().flatten().tolist()
        assert finite == allowed[row]
        assert torch.equal(logits[row, allowed[row]], original[row, allowed[row]])
    assert torch.equal(logits[1], original[1])  # not in `rows`: untouched

    # The library's own reference (numpy) agrees on every row.
    everything = original.clone()
    apply_bitmask_(everything, bitmask)
    reference = original.numpy().copy()
    llguidance.numpy.apply_token_bitmask_inplace(reference, bitmask.numpy())
    assert np.array_equal(everything.numpy(), reference)


def test_apply_bitmask_disallows_logits_wider_than_the_mask_and_checks_inputs() -> None:
    logits = torch.zeros(1, 100, dtype=torch.float16)
    apply_bitmask_(logits, torch.full((1, 2), -1, dtype=torch.int32), rows=torch.tensor([0]))
    assert torch.isfinite(logits[0, :64]).all() and torch.isneginf(logits[0, 64:]).all()
    with pytest.raises(TypeError):
        apply_bitmask_(logits, torch.zeros(1, 4, dtype=torch.int64))
    apply_bitmask_(logits, torch.zeros(1, 4, dtype=torch.int32), rows=[])  # no rows: nothing to do


def test_allocate_bitmask_is_all_allowed_host_int32() -> None:
    mask = allocate_bitmask(4, 49_152 + 10)
    assert mask.shape == (4, 1537) and mask.dtype == torch.int32 and mask.device.type == "cpu"
    assert bool((mask == -1).all())
    assert mask.is_pinned() == torch.cuda.is_available()


# --- the compiler service ---------------------------------------------------------------------------------


def test_cache_returns_the_same_compiled_grammar(compiler: GrammarCompiler) -> None:
    schema = {"type": "object", "properties": {"cached": {"type": "integer"}}, "required": ["cached"]}
    before = compiler.cache_info()
    first = compiler.compile(GrammarSpec.json_schema(schema, name="a"))
    second = compiler.compile(GrammarSpec.json_schema(schema, name="b"))  # name is metadata: same grammar
    assert isinstance(first, CompiledGrammar) and first is second
    info = compiler.cache_info()
    assert info["misses"] == before["misses"] + 1 and info["hits"] == before["hits"] + 1
    assert compiler.compile(GrammarSpec.json_schema({**schema, "required": []})) is not first


def test_cache_is_a_bounded_lru(tokenizer: Any) -> None:
    with GrammarCompiler(tokenizer, cache_size=2) as small:
        a, b, c = (GrammarSpec.regex(r) for r in ("a+", "b+", "c+"))
        first_a = small.compile(a)
        small.compile(b)
        assert small.compile(a) is first_a  # a hit makes `a` the most recent ...
        small.compile(c)  # ... so `b` is the one evicted
        assert small.cache_info()["size"] == 2
        assert small.compile(a) is first_a
        hits = small.cache_info()["hits"]
        small.compile(b)
        assert small.cache_info()["hits"] == hits  # recompiled


def test_submit_does_not_block_and_poll_reports_readiness(compiler: GrammarCompiler) -> None:
    handle = compiler.submit(GrammarSpec.json_schema({"enum": [f"value-{i}" for i in range(3000)]}))
    deadline = time.monotonic() + 10
    while (grammar := handle.poll()) is None:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert handle.done() and grammar.spec == handle.spec


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            GrammarSpec.json_schema({"type": "array", "uniqueItems": True}),
            'Unimplemented keys: ["uniqueItems"]',
        ),
        (GrammarSpec.json_schema({"type": "object", "not": {"required": ["a"]}}), "Unimplemented keys"),
        (GrammarSpec.json_schema({"if": {}, "then": {}}), "Unimplemented keys"),
        (GrammarSpec.json_schema({"type": "nonsense"}), "nonsense"),
        (GrammarSpec.json_schema({"$ref": "#/$defs/missing"}), "missing"),
        (GrammarSpec.json_schema({"type": "integer", "minimum": 5, "maximum": 1}), "minimum"),
        # x-guidance inside the schema cannot switch on lenient mode: unsupported keywords stay errors.
        (GrammarSpec.json_schema({"contains": {}, "x-guidance": {"lenient": True}}), "contains"),
        (GrammarSpec.regex("(unclosed"), "unclosed group"),
        (GrammarSpec.regex(r"(?=.*\d)[a-z0-9]{8}"), "look-around"),
        (GrammarSpec.regex(r"(a)\1"), "backreferences"),
    ],
)
def test_unsupported_or_broken_grammars_are_grammar_errors(
    compiler: GrammarCompiler, spec: GrammarSpec, message: str
) -> None:
    with pytest.raises(GrammarError, match="cannot use the") as info:
        compiler.compile(spec)
    assert message in str(info.value) and "\n" not in str(info.value)


def _deep_object(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        node = {"type": "object", "properties": {"a": node}, "required": ["a"]}
    return node


def _deep_array(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "integer"}
    for _ in range(depth):
        node = {"type": "array", "items": node}
    return node


HOSTILE = [
    GrammarSpec.json_schema(_deep_object(100)),
    GrammarSpec.json_schema(_deep_array(100)),
    GrammarSpec.json_schema({"enum": [f"s{i:05d}-{i * 7919 % 10007}" for i in range(20_000)]}),
    GrammarSpec.json_schema({"type": "string", "minLength": 10_000, "maxLength": 20_000}),
    GrammarSpec.json_schema({"type": "string", "pattern": "^((a{1,20}){1,20}){1,20}$"}),
    GrammarSpec.regex(r"(a+)+$"),
    GrammarSpec.regex(r"(a|aa)*b"),
    GrammarSpec.regex(r"(([a-z]{1,50}){1,50}){1,50}"),
]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("spec", HOSTILE, ids=lambda s: f"{s.kind}:{s.source[:40]}")
def test_hostile_grammars_compile_or_fail_within_the_timeout(tokenizer: Any, spec: GrammarSpec) -> None:
    with GrammarCompiler(tokenizer, timeout_s=10.0) as fresh:  # no cache: each one is a cold compile
        start = time.monotonic()
        try:
            grammar = fresh.compile(spec)
        except GrammarError as exc:
            assert "cannot use the" in str(exc)
        else:
            mask = allocate_bitmask(1, fresh.vocab_size, pin_memory=False)
            grammar.new_matcher().fill_bitmask(mask, 0)
        assert time.monotonic() - start < 10.0 + 2.0


@pytest.mark.timeout(60)
def test_a_compile_past_its_deadline_fails_and_the_service_keeps_working(tokenizer: Any) -> None:
    release = threading.Event()
    with GrammarCompiler(tokenizer, timeout_s=0.3, max_workers=1) as c:
        real_compile = c._compile

        def stuck(spec: GrammarSpec) -> CompiledGrammar:  # a native call that does not return in time
            if spec.source == "stuck+":
                release.wait(30)
            return real_compile(spec)

        c._compile = stuck  # type: ignore[method-assign]
        stuck_handle = c.submit(GrammarSpec.regex("stuck+"))
        queued = c.submit(GrammarSpec.regex("queued+"))  # behind it on the only worker
        assert stuck_handle.poll() is None and not stuck_handle.done()
        time.sleep(0.35)
        with pytest.raises(GrammarError, match="took longer than 0.3 s"):
            stuck_handle.poll()
        with pytest.raises(GrammarError, match="took longer than 0.3 s"):
            queued.poll()  # never started: cancelled and forgotten, so a later request retries it
        with pytest.raises(GrammarError, match="took longer"):
            c.submit(GrammarSpec.regex("stuck+")).poll()  # still running: fails at once, no new thread
        release.set()  # the stuck compile returns; its worker serves the retry
        assert c.compile(GrammarSpec.regex("queued+")).spec == GrammarSpec.regex("queued+")
        assert c.submit(GrammarSpec.regex("stuck+")).result().spec.source == "stuck+"  # its result is kept

    # Closing cancels what is queued: its requests fail at once rather than wait for their deadline.
    release.clear()
    c = GrammarCompiler(tokenizer, timeout_s=30.0, max_workers=1)
    c._compile = stuck  # type: ignore[method-assign]
    c.submit(GrammarSpec.regex("stuck+"))
    queued = c.submit(GrammarSpec.regex("queued+"))
    c.close()
    with pytest.raises(GrammarError, match="compiler was closed"):
        queued.poll()
    release.set()

    # A real compile that cannot finish within a tiny timeout: an error naming the timeout, promptly.
    with GrammarCompiler(tokenizer, timeout_s=0.001) as hurried:
        start = time.monotonic()
        with pytest.raises(GrammarError, match="took longer than 0.001 s"):
            hurried.compile(HOSTILE[2])
        assert time.monotonic() - start < 1.0


# --- matchers ---------------------------------------------------------------------------------------------


def _allowed(mask: torch.Tensor, row: int) -> list[int]:
    bits = mask[row].numpy().view(np.uint32)
    return [t for t in range(bits.size * 32) if (int(bits[t // 32]) >> (t % 32)) & 1]


def test_matcher_accepts_terminates_and_masks_padding(compiler: GrammarCompiler, tokenizer: Any) -> None:
    spec = GrammarSpec.json_schema(
        {
            "type": "object",
            "properties": {"a": {"type": "integer"}},
            "required": ["a"],
            "additionalProperties": False,
        }
    )
    matcher = compiler.compile(spec).new_matcher()
    mask = allocate_bitmask(2, compiler.vocab_size)
    assert mask.shape[1] == bitmask_width(len(tokenizer) + PAD)
    matcher.fill_bitmask(mask, 1)
    assert bool((mask[0] == -1).all())  # other rows untouched
    first = _allowed(mask, 1)
    assert first and all(tokenizer.decode([t]).startswith("{") for t in first)
    assert max(first) < len(tokenizer)

    tokens = tokenizer.encode('{"a": 12}', add_special_tokens=False)
    for t in tokens[:-1]:
        matcher.fill_bitmask(mask, 1)
        assert t in _allowed(mask, 1)
        assert matcher.accept(t) and not matcher.is_terminated
    assert matcher.is_accepting is False
    assert matcher.accept(tokens[-1]) and matcher.is_terminated and matcher.is_accepting
    matcher.fill_bitmask(mask, 1)
    assert _allowed(mask, 1) == [tokenizer.eos_token_id]  # complete: only EOS may follow
    assert matcher.error is None

    other = compiler.compile(spec).new_matcher()  # a fresh copy starts over
    assert not other.accept(tokenizer.encode("x", add_special_tokens=False)[0])
    assert other.error is not None and other.is_terminated
    assert not compiler.compile(spec).new_matcher().accept(len(tokenizer) + 3)  # a padding id


def test_matcher_json_layout_and_ascii_regex_classes(compiler: GrammarCompiler, tokenizer: Any) -> None:
    def accepts(spec: GrammarSpec, text: str) -> bool:
        m = compiler.compile(spec).new_matcher()
        ok = all(m.accept(t) for t in tokenizer.encode(text, add_special_tokens=False))
        return ok and m.is_accepting

    obj = GrammarSpec.json_object()
    assert accepts(obj, '{"k": [1, {"x": null}], "z": "q"}')
    assert not accepts(obj, '{"k":1}')  # one layout: json.dumps' separators, no free whitespace
    assert not accepts(obj, "[1, 2]")  # an object, not any JSON value
    digits = GrammarSpec.regex(r"\d{2}")
    assert accepts(digits, "42") and not accepts(digits, "\U0001fbf4\U0001fbf2")  # ASCII \d only
    assert accepts(GrammarSpec.regex(r"^a/b$"), "a/b")  # a slash in a regex is not Lark's delimiter


def test_fill_bitmasks_matches_row_by_row(compiler: GrammarCompiler, tokenizer: Any) -> None:
    specs = [
        GrammarSpec.json_object(),
        GrammarSpec.regex("[a-c]{2,4}"),
        GrammarSpec.json_schema({"enum": [1, 2]}),
    ]
    matchers = [compiler.compile(s).new_matcher() for s in specs]
    matchers[0].accept(tokenizer.encode('{"', add_special_tokens=False)[0])
    together = allocate_bitmask(4, compiler.vocab_size)
    fill_bitmasks([(m, row) for m, row in zip(matchers, (0, 1, 3), strict=True)], together)
    one_by_one = allocate_bitmask(4, compiler.vocab_size)
    for m, row in zip(matchers, (0, 1, 3), strict=True):
        m.fill_bitmask(one_by_one, row)
    assert torch.equal(together, one_by_one) and bool((together[2] == -1).all())
    with pytest.raises(Exception):  # noqa: B017 - llguidance's own error type for a wrong mask size
        matchers[1].fill_bitmask(allocate_bitmask(1, len(tokenizer)), 0)



@pytest.mark.parametrize("size", [1, 2, 3, 9])  # the plain loop (<= 2 pairs) and llguidance's pool
def test_consume_tokens_matches_one_by_one(compiler: GrammarCompiler, tokenizer: Any, size: int) -> None:
    """The engine's batched consume gives each matcher the state, verdict and error of `accept`."""
    specs = [
        GrammarSpec.json_schema({"enum": [1, 2]}), GrammarSpec.regex("[a-c]{2,4}"), GrammarSpec.json_object()
    ]
    texts = ["1", "x", "{"]  # completes its grammar / refused / goes on
    pairs_batched, pairs_single = [], []
    for i in range(size):
        spec, text = specs[i % 3], texts[i % 3]
        token = tokenizer.encode(text, add_special_tokens=False)[0]
        pairs_batched.append((compiler.compile(spec).new_matcher(), token))
        pairs_single.append((compiler.compile(spec).new_matcher(), token))
    together = consume_tokens(pairs_batched, threads=2)
    assert together == [m.accept(t) for m, t in pairs_single]
    assert together == [[True, False, True][i % 3] for i in range(size)]
    for (a, _), (b, _) in zip(pairs_batched, pairs_single, strict=True):
        assert (a.is_terminated, a.is_accepting, a.error) == (b.is_terminated, b.is_accepting, b.error)
    assert pairs_batched[0][0].is_terminated  # "1" completed the enum: the engine ends that reply


class _Seq:
    """What the grammar gate reads and writes of a sequence (`gate.Constrained`)."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        self.grammar_slot: int | None = None
        self.mask_ready = False
        self.grammar_end: tuple[str, int] | None = None
        self.finish_reason: str | None = None
        self.grammar = None


def test_gate_consumes_beside_the_caller_and_keeps_one_mask_slot_per_sequence(
    compiler: GrammarCompiler, tokenizer: Any
) -> None:
    """A step's tokens are consumed and the next masks filled by the gate's job; `mask` uses them (row i
    of the logits by the slot of `seqs[i]`), fills only the masks the job did not, and grows its buffers
    past `max_rows`; a token that completes the grammar ends it at that token's position; a freed slot
    is given out again, lowest first."""
    from worker.engine.logprobs import SampledReadback
    from worker.engine.structured.gate import GIL_SWITCH_S, GrammarGate

    def token(text: str) -> int:
        return tokenizer.encode(text, add_special_tokens=False)[0]

    gate = GrammarGate(tokenizer, compiler.vocab_size, [], max_rows=2, device=torch.device("cpu"))
    enum, regex = GrammarSpec.json_schema({"enum": [1, 2]}), GrammarSpec.regex("[a-c]{2,4}")
    seqs = [_Seq(compiler.compile(spec).new_matcher()) for spec in (enum, regex, regex)]
    free = _Seq(None)
    interval = sys.getswitchinterval()
    try:
        logits = torch.zeros(4, compiler.vocab_size)
        gate.mask(logits, [seqs[0], free, seqs[1], seqs[2]])  # three slots: past max_rows
        assert [s.grammar_slot for s in seqs] == [0, 1, 2] and not any(s.mask_ready for s in seqs)
        for row, seq in ((0, seqs[0]), (2, seqs[1]), (3, seqs[2])):
            expected = allocate_bitmask(1, compiler.vocab_size)
            seq.matcher.fill_bitmask(expected, 0)  # type: ignore[union-attr]
            assert _allowed(expected, 0) == torch.isfinite(logits[row]).nonzero().flatten().tolist()
        assert bool(torch.isfinite(logits[1]).all())  # the free row is untouched
        sampled = torch.tensor([token("1"), token("a"), token("b")])  # completes / goes on / goes on
        gate.after_sampling(SampledReadback(sampled, None), seqs, [10, 11, 12])
        assert sys.getswitchinterval() == min(interval, GIL_SWITCH_S)  # the job gets the GIL back promptly
        gate.settle()
        assert seqs[0].grammar_end == ("stop", 10) and not seqs[0].mask_ready
        assert seqs[1].mask_ready and seqs[2].mask_ready and seqs[1].grammar_end is None
        # The job filled their next masks: `mask` uses those (a stale fill would be the same here; the
        # matchers' state after "a" allows a second character but not "}").
        logits = torch.zeros(2, compiler.vocab_size)
        gate.mask(logits, [seqs[1], seqs[0]])
        assert bool(torch.isfinite(logits[1]).all())  # its grammar ended: no mask row
        assert not bool(torch.isfinite(logits[0, token("}")]))
        assert bool(torch.isfinite(logits[0, token("c")]))
        gate.release(seqs[1])
        gate.release(seqs[0])
        newcomer = _Seq(compiler.compile(regex).new_matcher())
        gate.mask(torch.zeros(1, compiler.vocab_size), [newcomer])
        assert newcomer.grammar_slot == 0 and seqs[0].grammar_slot is None
    finally:
        gate.close()
        sys.setswitchinterval(interval)


# --- the real model, constrained --------------------------------------------------------------------------

# Small schemas, bounded where JSON Schema can bound them (string lengths, integer ranges, item counts, no
# extra properties), so that complete replies are short. Decimal digits of a `number` and an object of
# `json_object` have no such bound: a reply that rambles past MAX_NEW_TOKENS ends with "length" and cannot
# parse, which the engine reports as such; these prompts and seeds finish well within it (greedy and
# seeded sampling are deterministic on one torch build).
_NAME = {"type": "string", "minLength": 1, "maxLength": 16}
GEN_SCHEMAS: list[tuple[str, dict[str, Any], str]] = [
    (
        "person",
        {
            "type": "object",
            "properties": {"name": _NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
            "required": ["name", "age"],
            "additionalProperties": False,
        },
        "Give a person's name and age as JSON.",
    ),
    (
        "enum",
        {
            "type": "object",
            "properties": {"color": {"enum": ["red", "green", "blue"]}},
            "required": ["color"],
            "additionalProperties": False,
        },
        "What color is the sky? Answer in JSON.",
    ),
    (
        "const_bool",
        {
            "type": "object",
            "properties": {"version": {"const": "v2"}, "ok": {"type": "boolean"}},
            "required": ["version", "ok"],
            "additionalProperties": False,
        },
        "Report a status as JSON.",
    ),
    (
        "nested",
        {
            "type": "object",
            "properties": {
                "user": {
                    "type": "object",
                    "properties": {
                        "name": _NAME,
                        "address": {
                            "type": "object",
                            "properties": {"city": _NAME, "country": _NAME},
                            "required": ["city", "country"],
                            "additionalProperties": False,
                        },
                    },
                    "required": ["name", "address"],
                    "additionalProperties": False,
                }
            },
            "required": ["user"],
            "additionalProperties": False,
        },
        "Give a user with an address as JSON.",
    ),
    (
        "int_array",
        {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 99},
            "minItems": 1,
            "maxItems": 5,
        },
        "List a few small numbers as a JSON array.",
    ),
    (
        "object_array",
        {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{2}$"},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
            "minItems": 1,
            "maxItems": 3,
        },
        "List order lines with sku and qty as JSON.",
    ),
    (
        "exclusive_bounds",
        {
            "type": "object",
            "properties": {"score": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 10}},
            "required": ["score"],
            "additionalProperties": False,
        },
        "Rate this movie from 1 to 9 as JSON.",
    ),
    (
        "number_range",
        {
            "type": "object",
            "properties": {"p": {"type": "number", "minimum": 0, "maximum": 1}},
            "required": ["p"],
            "additionalProperties": False,
        },
        "Give a probability as JSON.",
    ),
    (
        "string_lengths",
        {
            "type": "object",
            "properties": {"code": {"type": "string", "minLength": 3, "maxLength": 6}},
            "required": ["code"],
            "additionalProperties": False,
        },
        "Invent a short code as JSON.",
    ),
    (
        "string_pattern",
        {
            "type": "object",
            "properties": {"id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}},
            "required": ["id"],
            "additionalProperties": False,
        },
        "Give a ticket id like ABC-123 as JSON.",
    ),
    (
        "format_date",
        {
            "type": "object",
            "properties": {"date": {"type": "string", "format": "date"}},
            "required": ["date"],
            "additionalProperties": False,
        },
        "When did the first moon landing happen? Answer as JSON.",
    ),
    (
        "anyOf_scalar",
        {
            "type": "object",
            "properties": {"value": {"anyOf": [_NAME, {"type": "integer", "minimum": -100, "maximum": 100}]}},
            "required": ["value"],
            "additionalProperties": False,
        },
        "Give any value as JSON.",
    ),
    (
        "anyOf_objects",
        {
            "anyOf": [
                {
                    "type": "object",
                    "properties": {
                        "kind": {"const": "circle"},
                        "r": {"type": "integer", "minimum": 1, "maximum": 9},
                    },
                    "required": ["kind", "r"],
                    "additionalProperties": False,
                },
                {
                    "type": "object",
                    "properties": {
                        "kind": {"const": "square"},
                        "side": {"type": "integer", "minimum": 1, "maximum": 9},
                    },
                    "required": ["kind", "side"],
                    "additionalProperties": False,
                },
            ]
        },
        "Describe a shape as JSON.",
    ),
    (
        "oneOf",
        {
            "type": "object",
            "properties": {"v": {"oneOf": [{"type": "boolean"}, {"type": "null"}]}},
            "required": ["v"],
            "additionalProperties": False,
        },
        "Is water wet? Answer as JSON.",
    ),
    (
        "allOf",
        {
            "allOf": [
                {
                    "type": "object",
                    "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9}},
                    "required": ["a"],
                },
                {"type": "object", "properties": {"b": _NAME}, "required": ["b"]},
            ],
            # additionalProperties sees only the properties declared beside it: without these two it
            # would forbid `a` and `b` as well (llguidance reports that schema as unsatisfiable).
            "properties": {"a": True, "b": True},
            "additionalProperties": False,
        },
        "Give fields a and b as JSON.",
    ),
    (
        "ref_defs",
        {
            "$defs": {
                "point": {
                    "type": "object",
                    "properties": {
                        "x": {"type": "integer", "minimum": -9, "maximum": 9},
                        "y": {"type": "integer", "minimum": -9, "maximum": 9},
                    },
                    "required": ["x", "y"],
                    "additionalProperties": False,
                }
            },
            "type": "object",
            "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
            "required": ["from", "to"],
            "additionalProperties": False,
        },
        "Give a line segment as JSON.",
    ),
    (
        "optional_properties",
        {
            "type": "object",
            "properties": {
                "a": {"type": "integer", "minimum": 0, "maximum": 9},
                "b": {"type": "integer", "minimum": 0, "maximum": 9},
                "c": {"type": "integer", "minimum": 0, "maximum": 9},
            },
            "additionalProperties": False,
        },
        "Give some digits as JSON.",
    ),
    (
        "nullable",
        {
            "type": "object",
            "properties": {
                "nick": {"type": ["string", "null"], "maxLength": 12},
                "active": {"type": "boolean"},
            },
            "required": ["nick", "active"],
            "additionalProperties": False,
        },
        "Describe an account as JSON.",
    ),
    (
        "tuple",
        {
            "type": "array",
            "prefixItems": [_NAME, {"type": "integer", "minimum": 0, "maximum": 100}, {"type": "boolean"}],
            "items": False,
        },
        "Give a name, a number and a boolean as a JSON array.",
    ),
    (
        "tool_args",
        {
            "type": "object",
            "properties": {
                "location": {"type": "string", "maxLength": 24},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {
                    "type": "array",
                    "items": {"type": "string", "enum": ["mon", "tue", "wed"]},
                    "maxItems": 3,
                },
            },
            "required": ["location", "unit", "days"],
            "additionalProperties": False,
        },
        "Call the weather tool for Paris as JSON.",
    ),
    (
        "multipleOf",
        {
            "type": "object",
            "properties": {"n": {"type": "integer", "multipleOf": 5, "minimum": 0, "maximum": 100}},
            "required": ["n"],
            "additionalProperties": False,
        },
        "Give a multiple of five as JSON.",
    ),
    (
        "enum_mixed",
        {"enum": [1, "two", None, True, {"k": "v"}]},
        "Pick one value as JSON.",
    ),
]
GEN_OBJECT_PROMPTS = [
    "Reply with a JSON object with the keys city and country for Paris.",
    "Return a small JSON object with a title and a year for a famous book.",
    "Describe a dog as a short JSON object with name and breed.",
    "Return a JSON object with the keys x and y for the point (3, 4).",
]
GEN_REGEXES = [
    (r"\d{4}-\d{2}-\d{2}", "What is today's date?"),
    (r"(yes|no)", "Is the sky blue? Answer yes or no."),
    (r"[A-Z][a-z]{1,12}", "Name a city."),
]
MAX_NEW_TOKENS = 64
SAMPLED_TEMPERATURE = 0.8


@pytest.fixture(scope="module")
def padded_compiler(smol: LoadedModel) -> Iterator[GrammarCompiler]:
    tok = smol.tokenizer
    assert smol.model.config.vocab_size == len(tok)  # SmolLM2's logits are exactly its vocabulary
    with GrammarCompiler(tok, vocab_size=len(tok) + PAD, eos_token_ids={tok.eos_token_id}) as c:
        yield c


def _generate(
    smol: LoadedModel, compiler: GrammarCompiler, spec: GrammarSpec, prompt: str, seed: int | None
) -> tuple[str, str]:
    """(text, finish reason) of one constrained reply; greedy when `seed` is None, else sampled."""
    tok, model = smol.tokenizer, smol.model
    matcher = compiler.compile(spec).new_matcher()
    mask = allocate_bitmask(1, compiler.vocab_size)
    prompt_ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    if not isinstance(prompt_ids, list):
        prompt_ids = prompt_ids["input_ids"]
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    inputs, cache, out = torch.tensor([prompt_ids]), None, list[int]()
    # The session's model may have served a paged engine, which registered its own attention on it.
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        return _decode(model, tok, matcher, mask, inputs, cache, out, generator)
    finally:
        model.set_attn_implementation(previous)


def _decode(
    model: Any, tok: Any, matcher: Any, mask: torch.Tensor, inputs: torch.Tensor, cache: Any, out: list[int],
    generator: torch.Generator | None,
) -> tuple[str, str]:
    with torch.inference_mode():
        for _ in range(MAX_NEW_TOKENS):
            result = model(input_ids=inputs, past_key_values=cache, use_cache=True)
            cache = result.past_key_values
            matcher.fill_bitmask(mask, 0)  # the engine fills while this forward runs on the device
            logits = torch.cat([result.logits[:, -1, :].float(), torch.full((1, PAD), 50.0)], dim=1)
            apply_bitmask_(logits, mask, rows=[0])
            if generator is None:
                token = int(logits.argmax())
            else:
                probs = torch.softmax(logits / SAMPLED_TEMPERATURE, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=generator))
            assert token < len(tok), "a padding id was sampled"
            assert matcher.accept(token), matcher.error
            if token == tok.eos_token_id:
                return tok.decode(out), "stop"
            out.append(token)
            if matcher.is_terminated:
                return tok.decode(out), "stop"
            inputs = torch.tensor([[token]])
    return tok.decode(out), "length"


@pytest.mark.model
@pytest.mark.parametrize("mode", ["greedy", "sampled"])
@pytest.mark.parametrize(("name", "schema", "prompt"), GEN_SCHEMAS, ids=[g[0] for g in GEN_SCHEMAS])
def test_generated_json_parses_and_validates(
    smol: LoadedModel,
    padded_compiler: GrammarCompiler,
    name: str,
    schema: dict[str, Any],
    prompt: str,
    mode: str,
) -> None:
    spec = parse_response_format(_schema(schema))
    assert spec is not None
    text, finish = _generate(smol, padded_compiler, spec, prompt, seed=None if mode == "greedy" else 7)
    assert finish == "stop", f"{name}: no complete reply within {MAX_NEW_TOKENS} tokens: {text!r}"
    jsonschema.validate(json.loads(text), schema)


@pytest.mark.model
@pytest.mark.parametrize("mode", ["greedy", "sampled"])
@pytest.mark.parametrize("prompt", GEN_OBJECT_PROMPTS)
def test_generated_json_object_parses(
    smol: LoadedModel, padded_compiler: GrammarCompiler, prompt: str, mode: str
) -> None:
    spec = parse_response_format({"type": "json_object"})
    assert spec is not None
    text, finish = _generate(smol, padded_compiler, spec, prompt, seed=None if mode == "greedy" else 11)
    assert finish == "stop", f"no complete object within {MAX_NEW_TOKENS} tokens: {text!r}"
    assert isinstance(json.loads(text), dict)


@pytest.mark.model
@pytest.mark.parametrize(("pattern", "prompt"), GEN_REGEXES)
def test_generated_text_matches_the_regex(
    smol: LoadedModel, padded_compiler: GrammarCompiler, pattern: str, prompt: str
) -> None:
    import re

    for seed in (None, 3):
        text, finish = _generate(smol, padded_compiler, GrammarSpec.regex(pattern), prompt, seed=seed)
        assert finish == "stop" and re.fullmatch(pattern, text, flags=re.ASCII), text
