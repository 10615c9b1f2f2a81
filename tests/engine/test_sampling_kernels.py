"""The sampler's Triton kernels against their torch references: penalties, logprobs, the token bitmask.

Without a GPU they run on CPU tensors under Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1); tests/gpu/test_sampling_gpu.py repeats them on the GPU at a 128k vocabulary, with
the whole sampler inside a CUDA graph. Shapes cross the kernels' chunk edges (4,096 and 2,048 tokens),
use row subsets, and put -inf where a grammar or min_tokens would.
"""

from __future__ import annotations

import pytest
import torch

from worker.engine.kernels import kernels_usable
from worker.engine.logprobs import LogprobRows, compute_logprobs_reference
from worker.engine.penalties import apply_penalties
from worker.engine.structured.bitmask import allowed_tokens, apply_bitmask_reference_, bitmask_width

pytest.importorskip("triton")
if not kernels_usable(torch.device("cpu")):
    pytest.skip("Triton kernels on CPU tensors need TRITON_INTERPRET=1", allow_module_level=True)

from worker.engine.kernels.logprob_stats import logprob_stats  # noqa: E402
from worker.engine.kernels.penalties import apply_penalties_  # noqa: E402
from worker.engine.kernels.token_bitmask import apply_bitmask_kernel_  # noqa: E402

VOCAB = 9_000  # three logprob chunks (the last partial), five penalty chunks


def penalty_state(gen: torch.Generator, capacity: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts (mostly zero, some large) and prompt masks, as `PenaltyState` holds them."""
    counts = torch.randint(0, 4, (capacity, vocab), generator=gen, dtype=torch.int32)
    counts *= torch.rand(capacity, vocab, generator=gen) < 0.05
    counts[0, :7] = torch.tensor([1, 100, 0, 3, 2**20, 0, 5], dtype=torch.int32)
    mask = torch.rand(capacity, vocab, generator=gen) < 0.1
    return counts, mask


@pytest.mark.parametrize(
    ("repetition", "frequency", "presence"),
    [
        (True, True, True),
        (True, False, False),
        (False, True, False),
        (False, False, True),
        (False, True, True),
    ],
)
@pytest.mark.parametrize("subset", [False, True])
def test_penalties_kernel_equals_the_reference_bit_for_bit(
    repetition: bool, frequency: bool, presence: bool, subset: bool
) -> None:
    gen = torch.Generator().manual_seed(1)
    batch, capacity = 6, 8
    logits = torch.randn(batch, VOCAB, generator=gen) * 4
    logits[2, 100:200] = float("-inf")  # masked by min_tokens or a grammar: stays -inf
    logits[3, 5] = 0.0
    counts, mask = penalty_state(gen, capacity, VOCAB)
    logit_rows = torch.tensor([0, 2, 3, 5]) if subset else None
    state_rows = torch.tensor([7, 0, 3, 1]) if subset else torch.tensor([7, 0, 3, 1, 6, 2])
    num = state_rows.shape[0]
    rep = torch.tensor([1.3, 0.7, 2.0, 1.0, 1.1, 0.5][:num]) if repetition else None
    freq = torch.tensor([0.5, -1.0, 2.0, 0.0, 0.25, 1.5][:num]) if frequency else None
    pres = torch.tensor([-0.5, 1.0, 2.0, 0.3, 0.0, -2.0][:num]) if presence else None

    expected = logits.clone()
    selected = expected if logit_rows is None else expected.index_select(0, logit_rows)
    out = apply_penalties(
        selected.clone(),
        mask.index_select(0, state_rows),
        counts.index_select(0, state_rows),
        rep,
        freq,
        pres,
    )
    if logit_rows is None:
        expected = out
    else:
        expected.index_copy_(0, logit_rows, out)

    got = logits.clone()
    apply_penalties_(got, logit_rows, state_rows, counts, mask, rep, freq, pres)
    assert torch.equal(got, expected)
    if subset:  # rows without penalties are left as they were
        for row in (1, 4):
            assert torch.equal(got[row], logits[row])


def test_penalties_kernel_refuses_what_it_cannot_read() -> None:
    counts = torch.zeros(2, 10, dtype=torch.int32)
    with pytest.raises(ValueError, match="float32"):
        apply_penalties_(torch.zeros(1, 10, dtype=torch.float16), None, torch.tensor([0]), counts, None,
                         None, torch.tensor([1.0]), None)  # fmt: skip
    with pytest.raises(ValueError, match="prompt mask"):
        apply_penalties_(torch.zeros(1, 10), None, torch.tensor([0]), counts, None, torch.tensor([1.2]),
                         None, None)  # fmt: skip


@pytest.mark.parametrize("k", [0, 1, 5, 20])
@pytest.mark.parametrize("subset", [False, True])
def test_logprob_kernels_match_log_softmax_and_topk(k: int, subset: bool) -> None:
    """Sampled logprob and top k within 1e-5 of the reference (float32, another summation order); the
    top ids equal the reference's; a chunk entirely -inf and a row mostly -inf included."""
    gen = torch.Generator().manual_seed(2)
    batch = 5
    logits = torch.randn(batch, VOCAB, generator=gen) * 3
    logits[1, 4096:8192] = float("-inf")  # a whole chunk masked
    logits[4, :] = float("-inf")
    logits[4, [17, 4500, 8999]] = torch.tensor([1.0, 3.0, 2.0])  # a grammar allowing three tokens
    tokens = torch.tensor([3, 9, 8999, 4200, 4500])
    rows_list = [0, 1, 4] if subset else list(range(batch))
    rows = torch.tensor(rows_list) if subset else None
    temperature = torch.tensor([1.0, 0.7, 1.5, 1.0, 0.3][: len(rows_list)])
    spec = LogprobRows(rows, temperature, tuple(rows_list), tuple([k] * len(rows_list)))
    expected = compute_logprobs_reference(logits, tokens, spec)

    sampled, values, ids = logprob_stats(logits, tokens, rows, temperature, k)
    assert sampled.shape == (len(rows_list),) and values.shape == ids.shape == (len(rows_list), k)
    torch.testing.assert_close(sampled, expected.sampled, rtol=0, atol=1e-5)
    finite = torch.isfinite(expected.top_values)
    assert torch.equal(torch.isfinite(values), finite)
    torch.testing.assert_close(values[finite], expected.top_values[finite], rtol=0, atol=1e-5)
    assert torch.equal(ids[finite], expected.top_ids[finite])
    assert ((ids >= 0) & (ids < VOCAB)).all()


def test_logprob_kernels_on_half_precision_logits_read_them_as_float32() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, VOCAB, generator=gen) * 3).to(torch.bfloat16)
    tokens = torch.tensor([1, 2, 3])
    temperature = torch.ones(3)
    spec = LogprobRows(None, temperature, (0, 1, 2), (4, 4, 4))
    expected = compute_logprobs_reference(logits.float(), tokens, spec)
    sampled, values, ids = logprob_stats(logits, tokens, None, temperature, 4)
    torch.testing.assert_close(sampled, expected.sampled, rtol=0, atol=1e-5)
    torch.testing.assert_close(values, expected.top_values, rtol=0, atol=1e-5)


@pytest.mark.parametrize("vocab", [VOCAB, 49_152 + 5])
@pytest.mark.parametrize("subset", [False, True])
def test_bitmask_kernel_equals_the_reference(vocab: int, subset: bool) -> None:
    """Same -inf entries as the torch expansion; tokens past the mask's width (a model's logits wider
    than the grammar's vocabulary: 49,152 + 5) are disallowed."""
    gen = torch.Generator().manual_seed(4)
    batch = 4
    mask_vocab = min(vocab, 49_152)
    words = torch.randint(-(2**31), 2**31 - 1, (batch, bitmask_width(mask_vocab)), generator=gen,
                          dtype=torch.int64).to(torch.int32)  # fmt: skip
    words[1] = -1  # every token allowed
    words[2] = 0  # none
    logits = torch.randn(batch, vocab, generator=gen)
    rows = torch.tensor([0, 2, 3]) if subset else None
    expected = apply_bitmask_reference_(logits.clone(), words, rows)
    got = logits.clone()
    apply_bitmask_kernel_(got, words, rows)
    assert torch.equal(got, expected)
    if subset:  # each row by another mask row (the engine's one mask slot per sequence)
        assert rows is not None
        mask_rows = torch.tensor([3, 0, 2])
        expected = apply_bitmask_reference_(logits.clone(), words, rows, mask_rows)
        got = logits.clone()
        apply_bitmask_kernel_(got, words, rows, mask_rows)
        assert torch.equal(got, expected)
        assert bool(torch.isinf(got[2, :mask_vocab]).sum() == (~allowed_tokens(words[0:1], mask_vocab)).sum())
    if vocab > mask_vocab:
        assert torch.isinf(got[0, mask_vocab:]).all()
