"""The sampling extras through the paged engine on the default model: logprobs, penalties, logit bias,
min_tokens and stop_token_ids, each against what it must do to the same greedy run without it."""

from __future__ import annotations

import pytest
import torch
from engine_helpers import chat, collect, drain, engine_config, request

from worker.engine.model_files import LoadedModel
from worker.engine.paged_engine import PagedEngine

pytestmark = pytest.mark.model

PROMPT = "Write a short poem about the sea and the sky."
NEW = 24


def make_engine(smol: LoadedModel) -> PagedEngine:
    return PagedEngine(smol.model, smol.tokenizer, engine_config(max_num_seqs=16, kv_cache_bytes=64 << 20))


def run(engine: PagedEngine, **sampling: object) -> tuple[list[int], list]:
    """A greedy request's tokens and outputs (EOS ignored unless the test says otherwise)."""
    sampling.setdefault("ignore_eos", True)
    sampling.setdefault("max_tokens", NEW)
    engine.add_request(request("r", chat(engine, PROMPT), **sampling))  # type: ignore[arg-type]
    outputs = drain(engine)["r"]
    return collect(outputs)[0], outputs


def reference_logits(smol: LoadedModel, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V]: transformers' own logits (SDPA attention) that predicted each token."""
    model = smol.model
    previous = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + tokens[:-1]])).logits[0].float()
    finally:
        model.set_attn_implementation(previous)
    return logits[len(prompt) - 1 :]


def test_greedy_logprobs_are_log_softmax_of_the_models_logits(smol: LoadedModel) -> None:
    engine = make_engine(smol)
    tokens, outputs = run(engine, logprobs=True, top_logprobs=5)
    logprobs = [lp for out in outputs for lp in (out.logprobs or [])]
    assert [lp.token_id for lp in logprobs] == tokens
    expected = torch.log_softmax(reference_logits(smol, chat(engine, PROMPT), tokens), dim=-1)
    for i, lp in enumerate(logprobs):
        # FP32 on the CPU; the paged attention sums in another order than SDPA: 1e-3 absolute.
        assert lp.logprob == pytest.approx(float(expected[i, lp.token_id]), abs=1e-3)
        assert len(lp.top) == 5 and lp.top[0][0] == lp.token_id  # greedy: the most likely token
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        top_ids = torch.topk(expected[i], 5).indices.tolist()
        assert [t for t, _ in lp.top][:3] == top_ids[:3]


def test_penalties_bias_min_tokens_and_stop_token_ids_change_the_greedy_run(smol: LoadedModel) -> None:
    engine = make_engine(smol)
    plain, plain_outputs = run(engine)
    assert plain_outputs[-1].logprobs is None  # not asked: none computed
    assert len(set(plain)) < len(plain)  # the greedy run repeats tokens...
    presence, _ = run(engine, presence_penalty=2.0, frequency_penalty=2.0)
    assert presence != plain
    assert len(set(presence)) > len(set(plain))  # ...which the penalties discourage
    repetition, _ = run(engine, repetition_penalty=1.5)
    assert repetition != plain
    banned, _ = run(engine, logit_bias=((plain[0], -100.0),))
    assert banned[0] != plain[0] and plain[0] not in banned
    forced, _ = run(engine, logit_bias=((plain[3], 100.0),))
    assert set(forced) == {plain[3]}
    # stop_token_ids: the run ends at the first of them ("stop"), unless min_tokens holds it back.
    stop_at = plain[5]
    stopped, outs = run(engine, stop_token_ids=(stop_at,))
    assert stopped == plain[: plain.index(stop_at) + 1] and outs[-1].finish_reason == "stop"
    held, outs = run(engine, stop_token_ids=(stop_at,), min_tokens=plain.index(stop_at) + 2)
    assert len(held) > plain.index(stop_at) + 1 and stop_at not in held[: plain.index(stop_at) + 2]


def test_a_batch_mixing_extras_leaves_the_plain_rows_alone(smol: LoadedModel) -> None:
    engine = make_engine(smol)
    alone, _ = run(engine)
    prompt = chat(engine, PROMPT)
    engine.add_request(request("plain", prompt, max_tokens=NEW, ignore_eos=True))
    engine.add_request(request("penalised", prompt, max_tokens=NEW, ignore_eos=True, presence_penalty=2.0))
    engine.add_request(request("scored", prompt, max_tokens=NEW, ignore_eos=True, logprobs=True))
    outputs = drain(engine)
    assert collect(outputs["plain"])[0] == alone
    assert collect(outputs["scored"])[0] == alone  # logprobs do not change the tokens
    assert collect(outputs["penalised"])[0] != alone
    assert not engine.runner.penalties.allocated or len(engine.runner.penalties) == 0  # rows given back


def choices(engine: PagedEngine, n: int, seed: int) -> dict[str, list[int]]:
    """The tokens of `n` seeded choices of one prompt, handed over together as the worker does."""
    prompt = chat(engine, PROMPT)
    for i in range(n):
        seq_id = f"c#{i}" if i else "c"
        sampling = {"max_tokens": NEW, "ignore_eos": True, "temperature": 0.9, "seed": seed + i}
        engine.add_request(request(seq_id, prompt, **sampling))
    return {seq_id: collect(outs)[0] for seq_id, outs in drain(engine).items()}


def test_n_choices_compute_the_prompt_once_and_repeat_with_a_seed(smol: LoadedModel) -> None:
    engine = make_engine(smol)
    prompt_len = len(chat(engine, PROMPT))
    prefill = 0
    original_step = engine.step

    def counting_step() -> list:
        nonlocal prefill
        out = original_step()
        prefill += engine.last_step_stats().prefill_tokens
        return out

    engine.step = counting_step  # type: ignore[method-assign]
    first = choices(engine, 4, seed=11)
    assert sorted(first) == ["c", "c#1", "c#2", "c#3"] and all(len(t) == NEW for t in first.values())
    assert len({tuple(t) for t in first.values()}) > 1  # different seeds, different choices
    # The prompt once (choice 0), then each other choice at most its last partial block.
    assert prefill <= prompt_len + 3 * engine.block_manager.block_size, (prefill, prompt_len)
    assert choices(make_engine(smol), 4, seed=11) == first  # a seed repeats every choice
