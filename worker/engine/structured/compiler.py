"""Compiling grammars off the engine's step: a thread pool, an LRU cache keyed by spec, and a deadline.

The engine must never wait on a compile: `submit(spec)` returns a `GrammarHandle` at once and the engine
asks `handle.poll()` on later steps (None while compiling), keeping that one request out of the batch until
its grammar is ready while every other request keeps decoding. llguidance releases the GIL while it builds
a grammar, so a compile costs the engine's thread nothing but a core.

The cache holds the compile jobs themselves (futures), so concurrent requests with one schema share one
compile, failures are remembered (the same schema fails the same way), and a hit returns the very same
`CompiledGrammar`. It is bounded by entries (LRU); an evicted grammar lives on in the matchers using it.

Timeouts. A compile runs native code that Python cannot interrupt, so a deadline (`timeout_s` after
`submit` of the first request for that spec, queueing included) only stops the *waiting*: past it, `poll`
raises `GrammarError` and the request fails with that message. A job still queued is cancelled and
forgotten (a later request retries it). A job already running keeps its worker thread until llguidance
returns; its result then goes to the cache (or nowhere, if evicted). Meanwhile later requests for the same
spec fail at once instead of piling more threads onto it, and other specs use the remaining workers or
queue behind it (and time out if it never returns). llguidance bounds the work itself (`LLParserLimits`:
grammar size, lexer states and "fuel"), so a running compile does return: the slowest hostile input of
`loadtest/grammar_bench.py` (an enum of 20,000 strings) took ~50 ms. Worker threads are the
interpreter's usual non-daemon pool threads: `close()` cancels what is queued without waiting, but
interpreter exit still joins a compile in progress.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Collection
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import llguidance
import llguidance.hf

from worker.engine.structured.matcher import GrammarMatcher
from worker.engine.structured.spec import GrammarError, GrammarSpec

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions  # a TypedDict of the type stub only

# JSON output in json.dumps' default layout: `{"a": 1, "b": [1, 2]}`. Fixed separators instead of free
# whitespace: a small model given free whitespace can emit newlines until max_tokens, and the layout is
# the one models see most. Keywords llguidance cannot enforce are an error, never silently ignored
# (`lenient`); these overrides also win over any `x-guidance` options inside the user's schema.
JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": False,
}
_ANY_OBJECT = '{"type":"object"}'
_MAX_ERROR_CHARS = 400
_LABELS = {"json_object": "JSON object grammar", "json_schema": "JSON schema", "regex": "regex"}


def _message(spec: GrammarSpec, detail: str) -> str:
    text = f"cannot use the {_LABELS[spec.kind]}: {' '.join(detail.split())}"
    return text if len(text) <= _MAX_ERROR_CHARS else text[: _MAX_ERROR_CHARS - 3] + "..."


class CompiledGrammar:
    """A grammar built for one tokenizer: an llguidance matcher at the start state that each sequence
    copies (`new_matcher`, ~10 us). Immutable once built, so any thread may copy it."""

    __slots__ = ("_template", "compile_s", "spec")

    def __init__(self, spec: GrammarSpec, template: llguidance.LLMatcher, compile_s: float) -> None:
        self.spec = spec
        self.compile_s = compile_s
        self._template = template

    def new_matcher(self) -> GrammarMatcher:
        return GrammarMatcher(self._template.deep_copy(), self.spec)


@dataclass(eq=False)
class _Job:
    spec: GrammarSpec
    deadline: float  # time.monotonic()
    future: Future[CompiledGrammar]


class GrammarHandle:
    """A request's view of a compile: poll it once per step until it gives a grammar or raises."""

    __slots__ = ("_compiler", "_job", "spec")

    def __init__(self, compiler: GrammarCompiler, job: _Job) -> None:
        self._compiler = compiler
        self._job = job
        self.spec = job.spec

    def done(self) -> bool:
        """Whether `poll` would return a grammar or raise, rather than return None (never blocks)."""
        return self._job.future.done() or time.monotonic() >= self._job.deadline

    def poll(self) -> CompiledGrammar | None:
        """The compiled grammar, None while it compiles, or `GrammarError` (rejected, failed, timed out)."""
        future = self._job.future
        if future.done() and not future.cancelled():
            exc = future.exception()
            if exc is None:
                return future.result()
            # A fresh exception per caller: the job's own one would collect every caller's traceback.
            raise GrammarError(str(exc) if isinstance(exc, GrammarError) else _message(self.spec, repr(exc)))
        if future.cancelled() and time.monotonic() < self._job.deadline:
            raise GrammarError(_message(self.spec, "the grammar compiler was closed"))
        if future.cancelled() or time.monotonic() >= self._job.deadline:
            self._compiler._expire(self._job)
            raise GrammarError(
                _message(self.spec, f"compiling it took longer than {self._compiler.timeout_s:g} s")
            )
        return None

    def result(self) -> CompiledGrammar:
        """Block until the grammar is ready or the deadline passes (tools and tests; never the engine)."""
        wait_futures([self._job.future], timeout=max(0.0, self._job.deadline - time.monotonic()))
        compiled = self.poll()
        if compiled is None:  # the wait ends at the deadline, so poll raised unless the clock stalled
            raise GrammarError(_message(self.spec, "compile did not finish"))
        return compiled


class GrammarCompiler:
    """Compiles `GrammarSpec`s for one tokenizer on worker threads, with a bounded cache and a deadline.

    `tokenizer` is the model's Hugging Face fast tokenizer (or a ready `llguidance.LLTokenizer`); building
    llguidance's token index from it takes ~0.3-0.5 s (SmolLM2), so make one compiler per engine.
    `vocab_size` is the width of the model's logits, which may exceed `len(tokenizer)` (embedding tables
    padded to a multiple of 64 or 128): the masks cover that width and never allow the padding ids.
    `eos_token_ids` are the ids that may end a complete reply (the engine's EOS set); by default the
    tokenizer's EOS.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        vocab_size: int | None = None,
        eos_token_ids: Collection[int] | None = None,
        timeout_s: float = 10.0,
        cache_size: int = 256,
        max_workers: int = 2,
        limits: llguidance.LLParserLimits | None = None,
    ) -> None:
        if timeout_s <= 0 or cache_size < 1 or max_workers < 1:
            raise ValueError("timeout_s must be > 0, cache_size and max_workers >= 1")
        if isinstance(tokenizer, llguidance.LLTokenizer):
            self.tokenizer = tokenizer
        else:
            if vocab_size is not None and vocab_size < len(tokenizer):
                raise ValueError(
                    f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} ids"
                )
            eos = sorted(eos_token_ids) if eos_token_ids else None
            self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self.vocab_size: int = self.tokenizer.vocab_size
        self.timeout_s = timeout_s
        self.cache_size = cache_size
        # Short errors: llguidance's verbose ones dump parser state, which is no use to the caller.
        self.limits = limits if limits is not None else llguidance.LLParserLimits(verbose_errors=False)
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grammar-compile")
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, _Job] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def submit(self, spec: GrammarSpec) -> GrammarHandle:
        """Start compiling `spec` (or find it in the cache) and return at once."""
        key = spec.key
        with self._lock:
            job = self._cache.get(key)
            if job is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return GrammarHandle(self, job)
            self.misses += 1
            job = _Job(spec, time.monotonic() + self.timeout_s, self._pool.submit(self._compile, spec))
            self._cache[key] = job
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return GrammarHandle(self, job)

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """`submit(spec).result()`: blocking, for tools and tests."""
        return self.submit(spec).result()

    def cache_info(self) -> dict[str, int]:
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "size": len(self._cache),
                "max": self.cache_size,
            }

    def close(self) -> None:
        """Cancel queued compiles and release the pool without waiting for one in progress."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> GrammarCompiler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _expire(self, job: _Job) -> None:
        """A job past its deadline: cancel it if it has not started, and then forget it so a later
        request retries; a running one stays cached so its result is not wasted (see the module doc)."""
        if job.future.cancel() or job.future.cancelled():
            with self._lock:
                if self._cache.get(job.spec.key) is job:
                    del self._cache[job.spec.key]

    def _compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Runs on a pool thread: build the grammar, then one mask to surface per-step limits now."""
        start = time.perf_counter()
        try:
            if spec.kind == "regex":
                # As a Lark rule, so that `\d` and `\w` mean ASCII as in a schema's `pattern` (JavaScript's
                # meaning): llguidance's plain regex grammar follows Rust's Unicode classes, where `\d`
                # also matches digits of other scripts, which a reply constrained to `\d{4}` would not
                # expect to contain.
                rule = llguidance.regex_to_lark(spec.source, "dw")
                grammar = llguidance.LLMatcher.grammar_from_lark(f"start: /{rule}/")
            else:
                schema = spec.source if spec.kind == "json_schema" else _ANY_OBJECT
                grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
        except ValueError as exc:
            raise GrammarError(_message(spec, str(exc))) from None
        template = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self.limits)
        if not template.is_error():
            # The first mask builds the lexer states every copy starts from (copies then begin warm), and
            # a grammar too complex to step within llguidance's per-step limits fails here, not mid-reply.
            template.compute_bitmask()
        if template.is_error():
            raise GrammarError(_message(spec, template.get_error()))
        return CompiledGrammar(spec, template, time.perf_counter() - start)
