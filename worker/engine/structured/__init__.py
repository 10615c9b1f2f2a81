"""Structured output: replies constrained to a JSON schema, any JSON object, or a regex.

A request's `response_format` becomes a `GrammarSpec` (`parse_response_format`, which raises
`GrammarError`); the engine's `GrammarCompiler` compiles it on a worker thread into a `CompiledGrammar`
(cached by spec); each constrained sequence gets its own `GrammarMatcher`, which fills that sequence's row
of a per-step token bitmask and accepts each sampled token. The grammar engine is llguidance (see
`loadtest/grammar_bench.py` and docs/bench/cpu_grammar_libs.json for why it, not xgrammar).

How an engine uses it::

    compiler = GrammarCompiler(tokenizer, vocab_size=logits_width, eos_token_ids=engine_eos_ids)
    host_mask = allocate_bitmask(max_batch_rows, compiler.vocab_size)   # pinned when CUDA is there
    dev_mask = torch.empty_like(host_mask, device=device)

    # admission: a request with a spec waits (others keep running) until its grammar is ready
    handle = compiler.submit(spec)
    ...
    compiled = handle.poll()        # each step: None (still compiling), a grammar, or GrammarError
    seq.matcher = compiled.new_matcher()

    # step N, after launching the forward pass (which does not need the mask):
    for row, seq in constrained:    # or fill_bitmasks([(seq.matcher, row), ...], host_mask)
        seq.matcher.fill_bitmask(host_mask, row)
    dev_mask.copy_(host_mask, non_blocking=True)
    logits = ...                    # the forward's output, [rows, logits_width]
    apply_bitmask_(logits, dev_mask, rows=constrained_rows_on_device)
    tokens = sample(logits, ...).tolist()   # the step's one host sync; host_mask may be refilled after it
    # step N + 1, after launching its forward (the paged engine's order: the consume is off the critical
    # path, and the token step N + 1 sampled for an ended sequence is dropped):
    accepted = consume_tokens([(seq.matcher, tokens[row]) for row, seq in constrained])
    for (row, seq), ok in zip(constrained, accepted):
        if not ok:                                # only if something bypassed the mask
            finish(seq, error=seq.matcher.error)
        elif seq.matcher.is_terminated:           # the grammar is complete: the reply ends
            finish(seq, "stop")

A sampled EOS is allowed only where the grammar is complete; the engine's usual EOS check then finishes
the reply with "stop" as for any request. Masking must come before the sampler's extras: they add finite
values (bias) or scale (penalties), which keep -inf at -inf. Two of them can leave a row with no allowed
token: `min_tokens` and `ignore_eos` masking EOS where the grammar allows only EOS; a sequence that
`is_terminated` gets no mask row in the step it ends in, so that row is never empty (its token is dropped).
"""

from worker.engine.structured.bitmask import allocate_bitmask, allowed_tokens, apply_bitmask_, bitmask_width
from worker.engine.structured.compiler import CompiledGrammar, GrammarCompiler, GrammarHandle
from worker.engine.structured.matcher import GrammarMatcher, consume_tokens, fill_bitmasks
from worker.engine.structured.spec import GrammarError, GrammarKind, GrammarSpec, parse_response_format

__all__ = [
    "CompiledGrammar",
    "GrammarCompiler",
    "GrammarError",
    "GrammarHandle",
    "GrammarKind",
    "GrammarMatcher",
    "GrammarSpec",
    "allocate_bitmask",
    "allowed_tokens",
    "apply_bitmask_",
    "bitmask_width",
    "consume_tokens",
    "fill_bitmasks",
    "parse_response_format",
]
