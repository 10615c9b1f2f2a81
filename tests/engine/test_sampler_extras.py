"""The sampling extras: penalties, logit bias and min_tokens against transformers' logits processors,
logprobs from the processed logits, the device-side penalty rows, and batches without extras paying
nothing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
)

from worker.engine.base import SamplingParams, TokenLogprob
from worker.engine.logprobs import read_sampled
from worker.engine.penalties import PenaltyState
from worker.engine.sampler import (
    SamplingExtras,
    SamplingTensors,
    process_logits,
    sample,
    sample_with_extras,
)

EOS = (2, 7)


def params(**kwargs: Any) -> SamplingParams:
    return SamplingParams(**kwargs)


@dataclass
class Seq:
    """The part of `worker.engine.sequence.Sequence` the sampler reads."""

    seq_id: str
    sampling: SamplingParams
    token_ids: list[int]
    num_prompt_tokens: int = field(init=False)

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def sampling_step(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]


def random_logits(rows: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def random_ids(n: int, vocab: int, seed: int) -> list[int]:
    # Drawn from a small range so that tokens repeat.
    return torch.randint(0, min(vocab, 24), (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def build(
    seqs: list[Seq], state: PenaltyState | None, vocab: int, eos: tuple[int, ...] = EOS
) -> tuple[SamplingTensors, SamplingExtras]:
    sampling = [s.sampling for s in seqs]
    steps = [s.sampling_step for s in seqs]
    rows = state.rows_for(seqs) if state is not None else None
    tensors = SamplingTensors.from_params(sampling, steps, "cpu")
    extras = SamplingExtras.from_params(
        sampling, steps, "cpu", vocab_size=vocab, eos_token_ids=eos, penalty_rows=rows
    )
    return tensors, extras


def reference(logits: torch.Tensor, seq: Seq, eos: tuple[int, ...] = EOS) -> torch.Tensor:
    """One row processed by transformers' logits processors, in vLLM's order, then OpenAI's penalties."""
    p = seq.sampling
    vocab = logits.shape[-1]
    input_ids = torch.tensor([seq.token_ids])
    scores = logits.unsqueeze(0).clone()
    bias: list[list[list[int] | float]] = [[[t], b] for t, b in p.logit_bias if t < vocab]
    if bias:
        scores = SequenceBiasLogitsProcessor(bias)(input_ids, scores)
    if p.min_tokens:
        stops = [t for t in (*(() if p.ignore_eos else eos), *p.stop_token_ids) if t < vocab]
        scores = MinNewTokensLengthLogitsProcessor(seq.num_prompt_tokens, p.min_tokens, stops)(
            input_ids, scores
        )
    if p.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(input_ids, scores)
    # No transformers processor for OpenAI's frequency and presence penalties: the formula itself.
    counts = torch.bincount(torch.tensor(seq.output_ids, dtype=torch.int64), minlength=vocab)
    scores = scores - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
    return scores[0]


def generate(
    seqs: list[Seq],
    state: PenaltyState,
    logits_of: Callable[[int], torch.Tensor],
    num_steps: int,
    check: Callable[[torch.Tensor, torch.Tensor], None] | None = None,
) -> list[list[int]]:
    """Run `num_steps` steps as the model runner does; `check(raw, processed)` sees each step's logits."""
    for step in range(num_steps):
        logits = logits_of(step)
        tensors, extras = build(seqs, state, logits.shape[-1])
        if check is not None:
            check(logits, process_logits(logits, extras, state))
        tokens, logprobs = sample_with_extras(logits, tensors, extras, state)
        token_ids, _ = read_sampled(tokens, logprobs)
        for seq, token in zip(seqs, token_ids, strict=True):
            seq.token_ids.append(token)
    return [s.output_ids for s in seqs]


PENALISED = [
    params(repetition_penalty=1.3),
    params(repetition_penalty=0.7, temperature=0.8, seed=3),
    params(frequency_penalty=0.5, presence_penalty=0.25),
    params(frequency_penalty=-0.3, presence_penalty=1.1, temperature=1.2, seed=4),
    params(repetition_penalty=2.0, frequency_penalty=0.2, presence_penalty=-0.4),
    params(),  # no extras
    params(repetition_penalty=1.1, logit_bias=((3, 5.0), (10, -2.5), (1000, 9.0)), min_tokens=4),
    params(temperature=0.9, seed=5, logit_bias=((5, 1.5),), min_tokens=2, stop_token_ids=(11,)),
]


def test_penalties_bias_and_min_tokens_match_the_reference_step_by_step():
    """Over 12 steps of generation, with the counts kept on the device by `record`, every row's processed
    logits equal transformers' processors on the same token sequence (exactly: the same float32 ops)."""
    vocab = 64
    seqs = [Seq(f"s{i}", p, random_ids(5 + i, vocab, seed=i)) for i, p in enumerate(PENALISED)]
    state = PenaltyState(capacity=8, vocab_size=vocab, device="cpu")
    checked = []

    def check(raw: torch.Tensor, processed: torch.Tensor) -> None:
        for row, seq in enumerate(seqs):
            torch.testing.assert_close(processed[row], reference(raw[row], seq), rtol=0, atol=0)
        checked.append(True)
        # The device counts are the host's output tokens, row by row.
        for seq in seqs:
            if seq.seq_id in state:
                assert state.output_counts is not None
                counts = state.output_counts[state.rows_for([seq])[0]]
                assert torch.equal(
                    counts,
                    torch.bincount(torch.tensor(seq.output_ids, dtype=torch.int64), minlength=vocab).int(),
                )

    # Flat-ish logits, so that the penalties change which tokens win.
    generate(seqs, state, lambda step: random_logits(len(seqs), vocab, seed=100 + step, scale=1.0), 12, check)
    assert len(checked) == 12
    assert len(state) == 6  # rows only for the sequences with a penalty


def test_repetition_penalty_matches_transformers_on_long_sequences():
    vocab = 1000
    ids = torch.randint(0, vocab, (4, 300), generator=torch.Generator().manual_seed(1)).tolist()
    penalties = [1.2, 0.8, 1.0001, 3.0]
    seqs = []
    for i, (tokens, penalty) in enumerate(zip(ids, penalties, strict=True)):
        seq = Seq(f"r{i}", params(repetition_penalty=penalty), tokens[:200])
        seq.token_ids += tokens[200:]  # 100 output tokens, counted by `row_of`
        seqs.append(seq)
    state = PenaltyState(4, vocab, "cpu")
    logits = random_logits(4, vocab, seed=2)
    _, extras = build(seqs, state, vocab)
    processed = process_logits(logits, extras, state)
    for row, seq in enumerate(seqs):
        expected = RepetitionPenaltyLogitsProcessor(seq.sampling.repetition_penalty)(
            torch.tensor([seq.token_ids]), logits[row : row + 1].clone()
        )[0]
        assert torch.equal(processed[row], expected)


def test_logit_bias_matches_sequence_bias_and_drops_unknown_ids():
    vocab = 50
    bias = ((0, 3.0), (17, -100.0), (49, 0.125), (50, 7.0), (10**9, 1.0))
    seqs = [Seq("a", params(logit_bias=bias), [1, 2, 3]), Seq("b", params(), [4])]
    logits = random_logits(2, vocab, seed=3)
    _, extras = build(seqs, None, vocab)
    assert extras.bias is not None and extras.bias.ids.tolist() == [0, 17, 49]  # 50 and 10**9 dropped
    processed = process_logits(logits, extras)
    expected = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias[:3]])(
        torch.tensor([[1, 2, 3]]), logits[:1]
    )
    assert torch.equal(processed[0], expected[0])
    assert torch.equal(processed[1], logits[1])


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    vocab = 40
    logits = torch.zeros(1, vocab)
    logits[0, 2] = 50.0  # EOS would win
    seq = Seq("m", params(min_tokens=3, stop_token_ids=(9, 99)), [5, 6])
    masked = []
    for _ in range(5):
        _, extras = build([seq], None, vocab)
        processed = process_logits(logits, extras)
        expected = MinNewTokensLengthLogitsProcessor(2, 3, [2, 7, 9])(torch.tensor([seq.token_ids]), logits)
        assert torch.equal(processed, expected)
        masked.append(bool(processed[0, 2].isinf()))
        seq.token_ids.append(1)
    assert masked == [True, True, True, False, False]
    # ignore_eos: EOS is no stop, so only the stop token ids are masked (vLLM's rule).
    _, extras = build(
        [Seq("i", params(min_tokens=1, ignore_eos=True, stop_token_ids=(9,)), [5])], None, vocab
    )
    assert extras.banned is not None and extras.banned.ids.tolist() == [9]


def test_greedy_and_sampled_logprobs_come_from_the_processed_logits():
    """Greedy rows: log_softmax of the processed logits; sampled rows: of the processed logits over their
    temperature. Equal within 1e-6 absolute (float32; the same ops run on a row subset)."""
    vocab = 300
    rows = [
        params(logprobs=True, top_logprobs=5, repetition_penalty=1.5, logit_bias=((4, 2.0),)),
        params(),
        params(logprobs=True, temperature=0.7, seed=9, frequency_penalty=0.5),
        params(logprobs=True, top_logprobs=20, temperature=1.5),
        params(top_logprobs=3),  # top_logprobs without logprobs asks for nothing
        params(logprobs=True, top_logprobs=1, min_tokens=5),
    ]
    seqs = [Seq(f"l{i}", p, random_ids(30, vocab, seed=10 + i)) for i, p in enumerate(rows)]
    state = PenaltyState(4, vocab, "cpu")
    logits = random_logits(len(rows), vocab, seed=5)
    tensors, extras = build(seqs, state, vocab)
    processed = process_logits(logits, extras, state)
    tokens, logprobs = sample_with_extras(logits, tensors, extras, state)
    token_ids, result = read_sampled(tokens, logprobs)
    assert token_ids == tokens.tolist()
    assert result[1] is None and result[4] is None
    for row, want_top in ((0, 5), (2, 0), (3, 20), (5, 1)):
        entry = result[row]
        assert isinstance(entry, TokenLogprob)
        temperature = rows[row].temperature or 1.0
        expected = torch.log_softmax(processed[row] / temperature, dim=-1)
        assert entry.token_id == token_ids[row]
        assert abs(entry.logprob - float(expected[entry.token_id])) <= 1e-6
        assert len(entry.top) == want_top
        values = [v for _, v in entry.top]
        assert values == sorted(values, reverse=True)
        assert [t for t, _ in entry.top] == expected.topk(want_top).indices.tolist()
        for token, value in entry.top:
            assert abs(value - float(expected[token])) <= 1e-6
    # Greedy row: the sampled token is the top one, and the top list starts with it.
    first = result[0]
    assert first is not None and first.top[0][0] == first.token_id == int(processed[0].argmax())
    assert first.logprob == first.top[0][1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_without_extras_draw_what_they_draw_alone(dtype: torch.dtype):
    vocab = 500
    plain = [params(), params(temperature=0.8, seed=21), params(temperature=1.3, top_k=20, seed=22)]
    extra = [
        params(repetition_penalty=1.4, logprobs=True),
        params(temperature=0.9, seed=23, frequency_penalty=1.0, logit_bias=((1, 4.0),)),
        params(temperature=1.0, min_tokens=3, logprobs=True, top_logprobs=4),
    ]
    order = [3, 0, 4, 1, 5, 2]  # indices into plain + extra
    all_rows = plain + extra
    logits = random_logits(6, vocab, seed=7).to(dtype)
    seqs = [Seq(f"x{j}", all_rows[j], random_ids(10, vocab, seed=j)) for j in order]
    state = PenaltyState(8, vocab, "cpu")
    tensors, extras = build(seqs, state, vocab)
    tokens, _ = sample_with_extras(logits, tensors, extras, state)
    for row, j in enumerate(order):
        if j < len(plain):
            alone = sample(logits[row : row + 1], SamplingTensors.from_params([plain[j]], [0], "cpu"))
            assert int(tokens[row]) == int(alone)

    # Unseeded rows: the same batch and the same global RNG state, with and without the others' extras.
    unseeded = [params(temperature=1.0), params(temperature=0.5, top_p=0.9)]
    mixed = [unseeded[0], extra[0], unseeded[1], extra[2]]
    seqs = [Seq(f"u{i}", p, random_ids(8, vocab, seed=i)) for i, p in enumerate(mixed)]
    state = PenaltyState(4, vocab, "cpu")
    tensors, extras = build(seqs, state, vocab)
    torch.manual_seed(5)
    with_extras, _ = sample_with_extras(logits[:4], tensors, extras, state)
    torch.manual_seed(5)
    without = sample(logits[:4], tensors)
    assert int(with_extras[0]) == int(without[0]) and int(with_extras[2]) == int(without[2])


def test_seeded_sampling_with_penalties_is_reproducible_and_batch_independent():
    vocab = 200
    rows = [
        params(temperature=1.0, seed=1, repetition_penalty=1.3, presence_penalty=0.5),
        params(temperature=0.7, seed=2, frequency_penalty=0.8, top_k=30),
        params(temperature=1.1, seed=3, logit_bias=((7, 3.0),), min_tokens=4, top_p=0.9),
    ]

    def logits_of(step: int) -> torch.Tensor:
        return random_logits(len(rows), vocab, seed=1000 + step, scale=1.5)

    def run(order: list[int]) -> dict[int, list[int]]:
        seqs = [Seq(f"p{i}", rows[i], random_ids(12, vocab, seed=i)) for i in order]
        state = PenaltyState(len(rows), vocab, "cpu")
        outputs = generate(seqs, state, lambda step: logits_of(step)[order], 20)
        return dict(zip(order, outputs, strict=True))

    first = run([0, 1, 2])
    assert first == run([0, 1, 2])
    assert first == run([2, 0, 1])  # other rows, other penalty rows: the same draws
    alone = {i: run([i])[i] for i in range(3)}
    assert alone == first


def test_presence_penalty_steers_greedy_decoding_through_recorded_tokens():
    """Fixed logits: without penalty greedy repeats the argmax; a presence penalty larger than the spread
    makes every step pick a token not sampled yet, which needs each step's token recorded."""
    vocab = 64
    fixed = torch.linspace(3.0, 0.0, vocab).unsqueeze(0)
    seqs = [Seq("plain", params(), [60]), Seq("pres", params(presence_penalty=10.0), [60])]
    state = PenaltyState(2, vocab, "cpu")
    outputs = generate(seqs, state, lambda step: fixed.expand(2, -1), 10)
    assert outputs[0] == [0] * 10
    assert outputs[1] == list(range(10))


def test_penalty_state_rows_lifecycle():
    vocab = 50
    state = PenaltyState(capacity=2, vocab_size=vocab, device="cpu")
    assert not state.allocated
    state.record(torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))  # nothing to do
    assert not state.allocated

    a = state.row_of("a", [1, 2, 2], [3, 3, 4])
    assert state.allocated and state.output_counts is not None and state.prompt_mask is not None
    assert state.output_counts.shape == (2, vocab) and state.output_counts.dtype == torch.int32
    assert state.prompt_mask.shape == (2, vocab) and state.prompt_mask.dtype == torch.bool
    assert state.prompt_mask[a].nonzero().flatten().tolist() == [1, 2]
    assert {
        i: int(state.output_counts[a, i]) for i in state.output_counts[a].nonzero().flatten().tolist()
    } == {
        3: 2,
        4: 1,
    }
    assert state.row_of("a", [9], [9]) == a  # an existing row is returned unchanged
    assert state.prompt_mask[a, 9].item() is False

    b = state.row_of("b", [5], [])
    assert b != a and len(state) == 2
    with pytest.raises(RuntimeError):
        state.row_of("c", [1], [])

    # record adds one at each (row, token), repeated calls accumulate.
    state.record(torch.tensor([a, b]), torch.tensor([4, 7]))
    state.record(torch.tensor([b]), torch.tensor([7]))
    assert int(state.output_counts[a, 4]) == 2 and int(state.output_counts[b, 7]) == 2

    # Reuse after release: the new sequence sees only its own tokens.
    state.release("a")
    state.release("a")  # no-op
    c = state.row_of("c", [9], [9, 9, 1])
    assert c == a
    assert state.prompt_mask[c].nonzero().flatten().tolist() == [9]
    assert state.output_counts[c].nonzero().flatten().tolist() == [1, 9]
    assert int(state.output_counts[c, 9]) == 2

    # Recompute after preemption: released, then rebuilt from its tokens, the counts are those recorded.
    before = state.output_counts[b].clone(), state.prompt_mask[b].clone()
    state.release("b")
    assert state.row_of("b", [5], [7, 7]) == b
    assert torch.equal(state.output_counts[b], before[0]) and torch.equal(state.prompt_mask[b], before[1])

    # Ids outside the vocabulary are refused before a row is taken.
    state.release("b")
    with pytest.raises(ValueError):
        state.row_of("bad", [vocab], [])
    with pytest.raises(ValueError):
        state.row_of("bad", [1], [-1])
    assert "bad" not in state and state.row_of("d", [], []) == b


class RecordedOps(TorchDispatchMode):
    """Every tensor operation run inside the block, factories included."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def test_a_batch_without_extras_allocates_nothing_and_does_no_extra_work():
    vocab = 100
    rows = [
        params(),
        params(temperature=0.8, seed=1),
        params(temperature=1.0, top_k=5),
        params(stop_token_ids=(3,)),
    ]
    seqs = [Seq(f"n{i}", p, [1, 2, 3]) for i, p in enumerate(rows)]
    state = PenaltyState(4, vocab, "cpu")
    logits = random_logits(4, vocab, seed=8)
    tensors = SamplingTensors.from_params(rows, [0] * 4, "cpu")
    with RecordedOps() as recorded:
        penalty_rows = state.rows_for(seqs)
        extras = SamplingExtras.from_params(
            rows, [0] * 4, "cpu", vocab_size=vocab, eos_token_ids=EOS, penalty_rows=penalty_rows
        )
        processed = process_logits(logits, extras, state)
    assert recorded.ops == []  # no tensor built, no copy, no kernel
    assert penalty_rows == [-1] * 4 and not state.allocated and len(state) == 0
    assert not extras.active and not extras.processes
    assert (
        extras.penalties is None and extras.bias is None and extras.banned is None and extras.logprobs is None
    )
    assert processed is logits

    torch.manual_seed(3)
    with RecordedOps() as plain:
        expected = sample(logits, tensors)
    torch.manual_seed(3)
    with RecordedOps() as with_extras:
        tokens, logprobs = sample_with_extras(logits, tensors, extras, state)
    assert with_extras.ops == plain.ops
    assert logprobs is None and torch.equal(tokens, expected)
    assert not state.allocated

    # min_tokens already reached: nothing to mask, so still nothing to do.
    done = Seq("d", params(min_tokens=1), [1])
    done.token_ids.append(4)
    _, extras = build([done], state, vocab)
    assert not extras.active


def test_one_host_to_device_copy_for_all_the_extras():
    vocab = 100
    seqs = [
        Seq("a", params(repetition_penalty=1.2, logit_bias=((1, 1.0),), logprobs=True, top_logprobs=2), [1]),
        Seq("b", params(frequency_penalty=0.3, min_tokens=2, temperature=0.5), [2]),
    ]
    state = PenaltyState(2, vocab, "cpu")
    rows = state.rows_for(seqs)
    with RecordedOps() as recorded:
        SamplingExtras.from_params(
            [s.sampling for s in seqs], [0, 0], "cpu", vocab_size=vocab, eos_token_ids=EOS, penalty_rows=rows
        )
    copies = [op for op in recorded.ops if "_to_copy" in op or "copy_" in op]
    assert len(copies) <= 2  # the buffer's move (a no-op on CPU) and the one int32 -> int64 widening


def test_real_vocabulary_shapes():
    vocab = 49152
    rows = [
        params(repetition_penalty=1.2, presence_penalty=0.5, logprobs=True, top_logprobs=20),
        params(),
        params(temperature=0.8, seed=3, logit_bias=((49151, 30.0), (0, -1.0)), logprobs=True),
        params(min_tokens=2, frequency_penalty=0.1, temperature=1.0, seed=4, top_p=0.95),
    ]
    seqs = [
        Seq(f"v{i}", p, torch.randint(0, vocab, (64,), generator=torch.Generator().manual_seed(i)).tolist())
        for i, p in enumerate(rows)
    ]
    eos = (0, 49151)
    state = PenaltyState(capacity=16, vocab_size=vocab, device="cpu")
    logits = random_logits(4, vocab, seed=9).to(torch.bfloat16)
    for _ in range(3):
        sampling = [s.sampling for s in seqs]
        steps = [s.sampling_step for s in seqs]
        tensors = SamplingTensors.from_params(sampling, steps, "cpu")
        extras = SamplingExtras.from_params(
            sampling, steps, "cpu", vocab_size=vocab, eos_token_ids=eos, penalty_rows=state.rows_for(seqs)
        )
        processed = process_logits(logits, extras, state)
        assert processed.shape == (4, vocab) and processed.dtype == torch.float32
        for row, seq in enumerate(seqs):
            torch.testing.assert_close(
                processed[row], reference(logits[row].float(), seq, eos), rtol=0, atol=0
            )
        tokens, logprobs = sample_with_extras(logits, tensors, extras, state)
        assert logprobs is not None
        assert logprobs.top_ids.shape == (2, 20) and logprobs.top_values.shape == (2, 20)
        assert logprobs.sampled.shape == (2,) and logprobs.top_ids.dtype == torch.int64
        token_ids, result = read_sampled(tokens, logprobs)
        assert all(0 <= t < vocab for t in token_ids)
        assert result[0] is not None and len(result[0].top) == 20
        assert result[2] is not None and result[2].top == ()
        assert result[1] is None and result[3] is None
        for seq, token in zip(seqs, token_ids, strict=True):
            seq.token_ids.append(token)
    assert state.output_counts is not None and state.output_counts.shape == (16, vocab)
    assert int(state.output_counts.sum()) == 3 * 2  # two penalised rows, three steps recorded
