"""Batched token sampling on the device: greedy, temperature, top-k, top-p, per-request seeds.

One call samples every row of a step at once; nothing in it reads device memory back, so the
only host synchronisation of a step is the caller's single read of the sampled ids.

How the model runner calls it, once per step::

    tensors = SamplingTensors.from_params(
        [seq.sampling for seq in seqs],       # one SamplingParams per logits row
        [seq.sampling_step for seq in seqs],  # tokens each request has sampled so far
        logits.device,
    )
    token_ids = sample(logits, tensors).tolist()  # logits: [rows, vocab], any float dtype

Build the tensors before the forward pass if convenient (they only need the parameters and the
step indices), so their copy overlaps the model's work.

`sample_next_tokens(logits, params, steps)` does exactly that and returns the list.

The method, per row:

- Greedy (temperature 0, or below 1e-5): argmax of the logits. When every row is greedy the
  step is one argmax and nothing else.
- Otherwise the logits are upcast to float32 and divided by the temperature. Top-k (k > 0) and
  top-p (p < 1) become one cut-off value per row, read off a single sort of the batch (a
  `topk` of the largest k when no row uses top-p; no sort at all when no row uses either);
  top-p is applied to the distribution left after top-k. Tokens below the cut-off are dropped,
  so ties with the last kept token are all kept.
- The token is drawn with the exponential race (the Gumbel-max trick): with q ~ Exp(1) drawn
  independently for every (row, vocab entry), argmax(probs / q) is a sample from probs. It is
  computed as argmax(logits / T - log q), which is the same argmax without the softmax.

The noise q of an unseeded row comes from the global torch RNG on the device. The noise of a
seeded row is a counter-based hash of (seed, step index, vocab index) computed with integer
tensor ops, so a seeded request draws the same tokens from the same logits whatever other rows
share the batch, whatever its row index, on CPU and GPU alike, and after preemption and
recompute (the step index counts sampled tokens, which recompute keeps). No per-request RNG
state exists.

The extras (`SamplingParams.extras()`: penalties, logit bias, min_tokens, logprobs) are a second
per-step object, `SamplingExtras`, built on the host like `SamplingTensors` (one copy for all its
small tensors). With penalties, the model runner keeps a `PenaltyState` (`penalties.py`) of
capacity = its maximum number of running sequences and the model's vocabulary size, and per step::

    rows = penalty_state.rows_for(seqs)  # -1 for rows without penalties; fills new rows on the device
    extras = SamplingExtras.from_params(
        [seq.sampling for seq in seqs], [seq.sampling_step for seq in seqs], logits.device,
        vocab_size=logits.shape[-1], eos_token_ids=engine_eos_ids, penalty_rows=rows,
    )
    tokens, logprobs = sample_with_extras(logits, tensors, extras, penalty_state)
    token_ids, token_logprobs = read_sampled(tokens, logprobs)  # logprobs.py: the step's one host read

and `penalty_state.release(seq_id)` when a sequence finishes. `sample_with_extras` is
`process_logits` (a new float32 copy of the logits with the extras applied), `sample` on it,
`record_sampled` (the sampled tokens counted into the penalty rows, on the device) and
`logprobs.compute_logprobs`. The extras apply in vLLM's order (its v1 sampler: the logit bias and
min_tokens logits processors, then the penalties):

1. logit bias: each (token, bias) of the row added to the token's logit;
2. min_tokens: while the row has sampled fewer than `min_tokens` tokens, its `stop_token_ids` and,
   unless `ignore_eos`, the EOS ids get -inf;
3. repetition penalty, then frequency and presence penalties (`penalties.apply_penalties`; where the
   Triton kernels run, `kernels/penalties.py` does the same in place in one launch).

Temperature, top-k, top-p and the noise then work on the processed logits exactly as above. A batch
without extras builds nothing on the device and `sample_with_extras` is `sample`; a row without
extras in a batch with some is sampled from its own unchanged logits (upcast to float32, which does
not change its argmax nor its scores), so it draws what it would draw alone.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import torch

from worker.engine.base import SamplingParams
from worker.engine.kernels import kernels_usable
from worker.engine.logprobs import LogprobRows, LogprobTensors, compute_logprobs
from worker.engine.penalties import PenaltyState, apply_penalties, uses_penalties

# Temperatures below this are greedy: dividing by them would overflow or be argmax anyway.
GREEDY_TEMPERATURE = 1e-5

_MASK32 = 0xFFFFFFFF
_MASK64 = 0xFFFFFFFFFFFFFFFF
_INT32_MAX = 2**31 - 1
# Multipliers of the 32-bit finalizer (a lowbias32-style xorshift-multiply hash). Both are below
# 2**31, so the product with a 32-bit value stays below 2**63: exact in int64, no overflow.
_MUL_A = 0x21F0AAAD
_MUL_B = 0x735A2D97
# Odd constants that spread the seed halves, the step index and the vocab index apart before mixing.
_SEED_HI_SALT = 0x1B873593
_STEP_MUL = 0x5BD1E995
_VOCAB_MUL = 0x27D4EB2F
# Uniform draws keep the top 23 bits n of a hash: float32 holds (n + 0.5) / 2**23 exactly, and it
# lies in [2**-24, 1 - 2**-24], so -log of it is finite and positive.
_UNIFORM_SCALE = 1.0 / (1 << 23)
# exponential_() may return 0 on some backends; -log(0) is inf, and NaN on a dropped (-inf) token.
_MIN_EXPONENTIAL = 1e-20

# Layout of the packed per-row int32 buffer (one row of `_FIELDS` entries per field, batch long).
_TEMPERATURE, _TOP_P, _TOP_K, _SEED_LO, _SEED_HI, _STEP, _GREEDY = range(7)
_FIELDS = 7


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """Hash int64 values in [0, 2**32) to values in the same range, in place; returns `x`.

    Values stay non-negative and every product fits in int64, so no step relies on signed
    overflow or on right shifts of negative numbers: the result is bit-identical on every device.
    """
    x.bitwise_xor_(x >> 16)
    x.mul_(_MUL_A).bitwise_and_(_MASK32)
    x.bitwise_xor_(x >> 15)
    x.mul_(_MUL_B).bitwise_and_(_MASK32)
    return x.bitwise_xor_(x >> 15)


def _seeded_uniform(
    seed_lo: torch.Tensor, seed_hi: torch.Tensor, step: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """Uniform (0, 1) draws [rows, vocab_size] (float32), a pure function of (seed, step, vocab index).

    The seed and the step are mixed into one 32-bit key per row; each entry is then the hash of
    its spread vocab index xor the row's key.
    """
    key = _mix32_(seed_lo ^ _mix32_(seed_hi ^ _SEED_HI_SALT))
    key = _mix32_(key ^ ((step * _STEP_MUL) & _MASK32))
    vocab = torch.arange(vocab_size, dtype=torch.int64, device=key.device)
    vocab.mul_(_VOCAB_MUL).bitwise_and_(_MASK32)
    h = _mix32_(vocab.unsqueeze(0) ^ key.unsqueeze(1))
    return (h >> 9).to(torch.float32).add_(0.5).mul_(_UNIFORM_SCALE)


def seeded_exponential_noise(
    seed_lo: torch.Tensor, seed_hi: torch.Tensor, step: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """Exp(1) noise q [rows, vocab_size] (float32), a pure function of (seed, step, vocab index).

    `seed_lo`/`seed_hi` are the low and high 32 bits of each row's seed and `step` its step index,
    all int64 [rows] on the device the noise is wanted on.
    """
    return _seeded_uniform(seed_lo, seed_hi, step, vocab_size).log_().neg_()


@dataclass(frozen=True)
class SamplingTensors:
    """One step's sampling parameters, a row per logits row, as device tensors plus host flags.

    Greedy rows carry temperature 1, top-k off, top-p off and no seed, so the sampled path can run
    over every row and the greedy rows are swapped for their argmax at the end.
    """

    temperature: torch.Tensor  # float32 [B]
    top_k: torch.Tensor  # int32 [B], 0 = off
    top_p: torch.Tensor  # float32 [B], 1.0 = off
    seed_lo: torch.Tensor  # int32 [B], the seed's low 32 bits (two's complement)
    seed_hi: torch.Tensor  # int32 [B], the seed's high 32 bits
    step: torch.Tensor  # int32 [B], tokens the request has sampled so far
    greedy: torch.Tensor  # bool [B]
    seeded_rows: torch.Tensor  # int32 [number of seeded rows], their row indices
    # Host-side facts about the batch, known without reading the device.
    batch_size: int
    all_greedy: bool
    any_greedy: bool
    num_seeded: int
    num_unseeded: int  # sampled rows drawing from the global RNG
    any_top_k: bool
    any_top_p: bool
    max_top_k: int

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        steps: Sequence[int],
        device: torch.device | str,
    ) -> SamplingTensors:
        """Pack the rows' parameters on the host and move them with one copy.

        `steps[i]` is the number of tokens row i's request has sampled before this step. A batch
        of greedy rows needs none of the tensors: they are left empty and nothing is copied.
        """
        if len(params) != len(steps):
            raise ValueError(f"{len(params)} sampling params for {len(steps)} step indices")
        device = torch.device(device)
        batch = len(params)
        greedy = [p.temperature < GREEDY_TEMPERATURE for p in params]
        num_greedy = sum(greedy)
        if num_greedy == batch:
            empty = torch.empty(0, dtype=torch.int32, device=device)
            return cls(
                temperature=empty.view(torch.float32), top_k=empty, top_p=empty.view(torch.float32),
                seed_lo=empty, seed_hi=empty, step=empty, greedy=empty.bool(), seeded_rows=empty,
                batch_size=batch, all_greedy=True, any_greedy=batch > 0, num_seeded=0, num_unseeded=0,
                any_top_k=False, any_top_p=False, max_top_k=0,
            )  # fmt: skip

        # Greedy rows sample as temperature 1 with no truncation and no seed; their argmax wins later.
        temperature = [1.0] * batch
        top_p = [1.0] * batch
        top_k = [0] * batch
        seed_lo = [0] * batch
        seed_hi = [0] * batch
        seeded_rows: list[int] = []
        for row, p in enumerate(params):
            if greedy[row]:
                continue
            temperature[row] = p.temperature
            if p.top_p < 1.0:
                top_p[row] = p.top_p
            if p.top_k > 0:
                top_k[row] = min(p.top_k, _INT32_MAX)
            if p.seed is not None:
                seed = p.seed & _MASK64
                seed_lo[row] = seed & _MASK32
                seed_hi[row] = seed >> 32
                seeded_rows.append(row)
        # One int32 buffer of _FIELDS rows (floats as float32 bits, seed halves as uint32 bits), then
        # the seeded row indices; the host side is built without a tensor op per field.
        layout = f"<{2 * batch}f{batch}i{2 * batch}I{2 * batch}i{len(seeded_rows)}i"
        raw = bytearray(struct.calcsize(layout))
        struct.pack_into(
            layout, raw, 0,
            *temperature, *top_p, *top_k,
            *seed_lo, *seed_hi,
            *steps, *greedy, *seeded_rows,
        )  # fmt: skip
        host = torch.frombuffer(raw, dtype=torch.int32)
        if device.type == "cuda":
            host = host.pin_memory()
        on_device = host.to(device, non_blocking=True)
        rows = on_device[: _FIELDS * batch].view(_FIELDS, batch)
        return cls(
            temperature=rows[_TEMPERATURE].view(torch.float32),
            top_k=rows[_TOP_K],
            top_p=rows[_TOP_P].view(torch.float32),
            seed_lo=rows[_SEED_LO],
            seed_hi=rows[_SEED_HI],
            step=rows[_STEP],
            greedy=rows[_GREEDY].bool(),
            seeded_rows=on_device[_FIELDS * batch :],
            batch_size=batch,
            all_greedy=False,
            any_greedy=num_greedy > 0,
            num_seeded=len(seeded_rows),
            num_unseeded=batch - num_greedy - len(seeded_rows),
            any_top_k=any(k > 0 for k in top_k),
            any_top_p=any(p < 1.0 for p in top_p),
            max_top_k=max(top_k),
        )


def _uint32(values: torch.Tensor) -> torch.Tensor:
    """int32 bit patterns as their unsigned values, in int64."""
    return values.to(torch.int64) & _MASK32


def _cutoffs(scores: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """Per-row lowest score that survives top-k and top-p ([B, 1]; -inf where neither applies)."""
    vocab = scores.shape[-1]
    top_k = t.top_k.to(torch.int64)
    k_active = (top_k > 0) & (top_k < vocab)
    p_active = t.top_p < 1.0
    if not t.any_top_p:
        # Only top-k: the largest max_k scores are enough to read every row's k-th value.
        ordered = torch.topk(scores, min(t.max_top_k, vocab), dim=-1, sorted=True).values
    else:
        ordered = torch.sort(scores, dim=-1, descending=True).values
    limit = ordered.shape[-1]
    kth_index = torch.where(k_active, top_k, limit).clamp(max=limit) - 1
    kth = ordered.gather(-1, kth_index.unsqueeze(-1))
    cutoff = torch.where(k_active.unsqueeze(-1), kth, float("-inf"))
    if t.any_top_p:
        # Top-p on what top-k left: keep the shortest prefix whose mass reaches top_p.
        probs = torch.softmax(ordered.masked_fill(ordered < cutoff, float("-inf")), dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs
        kept = (mass_before < t.top_p.unsqueeze(-1)).sum(-1).clamp(min=1)
        pth = ordered.gather(-1, (kept - 1).unsqueeze(-1))
        cutoff = torch.where(p_active.unsqueeze(-1), torch.maximum(cutoff, pth), cutoff)
    return cutoff


def _gumbel_noise(shape: torch.Size, t: SamplingTensors, device: torch.device) -> torch.Tensor:
    """-log q [B, V] for q ~ Exp(1): seeded rows from their hash, the others from the global RNG."""
    batch, vocab = shape
    if t.num_seeded == batch:
        noise = seeded_exponential_noise(_uint32(t.seed_lo), _uint32(t.seed_hi), _uint32(t.step), vocab)
        return noise.log_().neg_()
    if t.num_unseeded:
        noise = torch.empty(shape, dtype=torch.float32, device=device).exponential_()
        noise.clamp_(min=_MIN_EXPONENTIAL).log_().neg_()
    else:  # only seeded and greedy rows; the greedy rows' noise is never used
        noise = torch.zeros(shape, dtype=torch.float32, device=device)
    if t.num_seeded:
        rows = t.seeded_rows.to(torch.int64)
        seeded = seeded_exponential_noise(
            _uint32(t.seed_lo.index_select(0, rows)),
            _uint32(t.seed_hi.index_select(0, rows)),
            _uint32(t.step.index_select(0, rows)),
            vocab,
        )
        noise.index_copy_(0, rows, seeded.log_().neg_())
    return noise


def sample(logits: torch.Tensor, tensors: SamplingTensors) -> torch.Tensor:
    """One token id per row of `logits` ([B, V], any float dtype): int64 [B] on logits' device."""
    if logits.dim() != 2 or logits.shape[0] != tensors.batch_size:
        raise ValueError(f"logits {tuple(logits.shape)} for a batch of {tensors.batch_size} rows")
    if tensors.all_greedy:
        return torch.argmax(logits, dim=-1)
    # A new float32 tensor (half-precision logits are promoted by the division); the caller's stays.
    scores = torch.div(logits, tensors.temperature.unsqueeze(-1))
    if tensors.any_top_k or tensors.any_top_p:
        scores.masked_fill_(scores < _cutoffs(scores, tensors), float("-inf"))
    # argmax(probs / q) == argmax(log probs - log q) == argmax(scores - log q).
    tokens = torch.argmax(scores.add_(_gumbel_noise(scores.shape, tensors, scores.device)), dim=-1)
    if tensors.any_greedy:
        tokens = torch.where(tensors.greedy, torch.argmax(logits, dim=-1), tokens)
    return tokens


def sample_next_tokens(
    logits: torch.Tensor, params: Sequence[SamplingParams], steps: Sequence[int]
) -> list[int]:
    """`sample` for a list of rows, read back with one `.tolist()`."""
    tensors = SamplingTensors.from_params(params, steps, logits.device)
    return [int(t) for t in sample(logits, tensors).tolist()]


@dataclass(frozen=True)
class PenaltyRows:
    """The rows of a step that set a penalty: where they are among the logits and in the `PenaltyState`."""

    logit_rows: torch.Tensor | None  # int64 [P]; None when every row of the batch is penalised
    state_rows: torch.Tensor  # int64 [P], their `PenaltyState` rows
    # float32 [P] each; None when no row of the batch sets that penalty (its work is skipped).
    repetition: torch.Tensor | None
    frequency: torch.Tensor | None
    presence: torch.Tensor | None


@dataclass(frozen=True)
class SparseLogits:
    """Logits entries (row, token) to change: `values` added (logit bias), or set to -inf when None."""

    rows: torch.Tensor  # int64 [N]
    ids: torch.Tensor  # int64 [N]
    values: torch.Tensor | None  # float32 [N]


@dataclass(frozen=True)
class SamplingExtras:
    """One step's extras, a group per kind of work; a group is None when no row of the batch needs it.

    A batch without extras has every group None: it cost no device tensor to build, and
    `process_logits` and `sample_with_extras` do nothing more than `sample`. Token ids outside the
    vocabulary (`logit_bias` and `stop_token_ids` entries) are dropped on the host: such a token can
    never be sampled, so biasing or masking it changes nothing, and indexing with it would abort the
    device.
    """

    batch_size: int
    penalties: PenaltyRows | None = None
    bias: SparseLogits | None = None
    banned: SparseLogits | None = None  # min_tokens: EOS and stop token ids masked this step
    logprobs: LogprobRows | None = None

    @property
    def processes(self) -> bool:
        """True when some row's logits change before sampling."""
        return self.penalties is not None or self.bias is not None or self.banned is not None

    @property
    def active(self) -> bool:
        """True when the step has any extra work at all (logits to change or logprobs to compute)."""
        return self.processes or self.logprobs is not None

    @classmethod
    def from_params(
        cls,
        params: Sequence[SamplingParams],
        steps: Sequence[int],
        device: torch.device | str,
        *,
        vocab_size: int,
        eos_token_ids: Collection[int] = (),
        penalty_rows: Sequence[int] | None = None,
    ) -> SamplingExtras:
        """Gather the rows' extras on the host and move them with one copy.

        `steps[i]` is the number of tokens row i has sampled (min_tokens compares it). `penalty_rows[i]`
        is row i's `PenaltyState` row (`PenaltyState.rows_for`); it is read only for rows that set a
        penalty, and needed only when one does.
        """
        if len(params) != len(steps):
            raise ValueError(f"{len(params)} sampling params for {len(steps)} step indices")
        batch = len(params)
        pen_logit_rows: list[int] = []
        pen_state_rows: list[int] = []
        repetition: list[float] = []
        frequency: list[float] = []
        presence: list[float] = []
        bias_rows: list[int] = []
        bias_ids: list[int] = []
        bias_values: list[float] = []
        ban_rows: list[int] = []
        ban_ids: list[int] = []
        lp_rows: list[int] = []
        lp_temperature: list[float] = []
        lp_top: list[int] = []
        for row, (p, step) in enumerate(zip(params, steps, strict=True)):
            if uses_penalties(p):
                state_row = -1 if penalty_rows is None else penalty_rows[row]
                if state_row < 0:
                    raise ValueError(f"row {row} sets a penalty but has no penalty state row")
                if not p.repetition_penalty > 0:
                    raise ValueError(f"repetition_penalty must be positive, not {p.repetition_penalty}")
                pen_logit_rows.append(row)
                pen_state_rows.append(state_row)
                repetition.append(p.repetition_penalty)
                frequency.append(p.frequency_penalty)
                presence.append(p.presence_penalty)
            for token, value in p.logit_bias:
                if value and 0 <= token < vocab_size:
                    bias_rows.append(row)
                    bias_ids.append(token)
                    bias_values.append(value)
            if step < p.min_tokens:
                stops = set(p.stop_token_ids) if p.ignore_eos else set(p.stop_token_ids).union(eos_token_ids)
                for token in sorted(stops):
                    if 0 <= token < vocab_size:
                        ban_rows.append(row)
                        ban_ids.append(token)
            if p.logprobs:
                lp_rows.append(row)
                lp_temperature.append(1.0 if p.temperature < GREEDY_TEMPERATURE else p.temperature)
                lp_top.append(p.top_logprobs)
        if not (pen_logit_rows or bias_rows or ban_rows or lp_rows):
            return cls(batch)

        all_penalised = len(pen_logit_rows) == batch
        all_logprobs = len(lp_rows) == batch
        any_repetition = any(r != 1.0 for r in repetition)
        any_frequency = any(frequency)
        any_presence = any(presence)
        # One int32 buffer: the index fields (widened to int64 on the device in one kernel), then the
        # float fields as float32 bits. A field no row uses is left out.
        index_fields = [
            [] if all_penalised else pen_logit_rows, pen_state_rows,
            bias_rows, bias_ids, ban_rows, ban_ids,
            [] if all_logprobs else lp_rows,
        ]  # fmt: skip
        float_fields = [
            repetition if any_repetition else [], frequency if any_frequency else [],
            presence if any_presence else [], bias_values, lp_temperature,
        ]  # fmt: skip
        num_index = sum(map(len, index_fields))
        num_float = sum(map(len, float_fields))
        layout = f"<{num_index}i{num_float}f"
        raw = bytearray(struct.calcsize(layout))
        struct.pack_into(
            layout, raw, 0, *(v for f in index_fields for v in f), *(v for f in float_fields for v in f)
        )
        host = torch.frombuffer(raw, dtype=torch.int32)
        device = torch.device(device)
        if device.type == "cuda":
            host = host.pin_memory()
        on_device = host.to(device, non_blocking=True)
        indices = on_device[:num_index].to(torch.int64)
        floats = on_device[num_index:].view(torch.float32)

        def split(source: torch.Tensor, fields: Sequence[Sequence[float]]) -> list[torch.Tensor | None]:
            """Each field's slice of `source`, None for a field no row uses."""
            out: list[torch.Tensor | None] = []
            start = 0
            for f in fields:
                out.append(source[start : start + len(f)] if f else None)
                start += len(f)
            return out

        p_logit, p_state, b_rows, b_ids, n_rows, n_ids, l_rows = split(indices, index_fields)
        rep, freq, pres, b_values, l_temperature = split(floats, float_fields)
        penalties = None
        if p_state is not None:
            penalties = PenaltyRows(p_logit, p_state, rep, freq, pres)
        bias = None
        if b_rows is not None and b_ids is not None:
            bias = SparseLogits(b_rows, b_ids, b_values)
        banned = None
        if n_rows is not None and n_ids is not None:
            banned = SparseLogits(n_rows, n_ids, None)
        logprobs = None
        if l_temperature is not None:
            logprobs = LogprobRows(l_rows, l_temperature, tuple(lp_rows), tuple(lp_top))
        return cls(batch, penalties, bias, banned, logprobs)


def process_logits(
    logits: torch.Tensor, extras: SamplingExtras, penalties: PenaltyState | None = None
) -> torch.Tensor:
    """The logits the rows sample from: `logits` itself without extras to apply, else a float32 copy
    with the logit bias, min_tokens and the penalties applied, in that order (the module docstring).

    The caller's logits are never written (they may be a CUDA graph's output buffer). `penalties`
    must hold the rows `extras` was built with.
    """
    if not extras.processes:
        return logits
    if logits.dim() != 2 or logits.shape[0] != extras.batch_size:
        raise ValueError(f"logits {tuple(logits.shape)} for a batch of {extras.batch_size} rows")
    out = logits.to(torch.float32, copy=True)
    if extras.bias is not None:
        assert extras.bias.values is not None
        out.index_put_((extras.bias.rows, extras.bias.ids), extras.bias.values, accumulate=True)
    if extras.banned is not None:
        out.index_put_((extras.banned.rows, extras.banned.ids), out.new_full((), float("-inf")))
    rows = extras.penalties
    if rows is not None:
        if penalties is None or penalties.output_counts is None or penalties.prompt_mask is None:
            raise ValueError("penalised rows without the PenaltyState holding their rows")
        if penalties.vocab_size != out.shape[-1]:
            raise ValueError(f"logits of {out.shape[-1]} tokens, penalty rows of {penalties.vocab_size}")
        if kernels_usable(out.device):
            from worker.engine.kernels.penalties import apply_penalties_  # triton: imported where it runs

            apply_penalties_(
                out, rows.logit_rows, rows.state_rows, penalties.output_counts, penalties.prompt_mask,
                rows.repetition, rows.frequency, rows.presence,
            )  # fmt: skip
            return out
        selected = out if rows.logit_rows is None else out.index_select(0, rows.logit_rows)
        counts = penalties.output_counts.index_select(0, rows.state_rows)
        mask = None if rows.repetition is None else penalties.prompt_mask.index_select(0, rows.state_rows)
        selected = apply_penalties(selected, mask, counts, rows.repetition, rows.frequency, rows.presence)
        if rows.logit_rows is None:
            out = selected
        else:
            out.index_copy_(0, rows.logit_rows, selected)
    return out


def record_sampled(penalties: PenaltyState | None, extras: SamplingExtras, tokens: torch.Tensor) -> None:
    """Count the step's sampled tokens (int64 [B]) into the penalised rows' output counts, on the device."""
    rows = extras.penalties
    if rows is None:
        return
    if penalties is None:
        raise ValueError("penalised rows without the PenaltyState holding their rows")
    sampled = tokens if rows.logit_rows is None else tokens.index_select(0, rows.logit_rows)
    penalties.record(rows.state_rows, sampled)


def sample_with_extras(
    logits: torch.Tensor,
    tensors: SamplingTensors,
    extras: SamplingExtras,
    penalties: PenaltyState | None = None,
) -> tuple[torch.Tensor, LogprobTensors | None]:
    """`sample` with the extras: process the logits, sample, record the tokens for the penalties, and
    compute the logprobs of the rows that asked (None when none did). Nothing is read back: pass both
    results to `logprobs.read_sampled` for the step's one host read."""
    processed = process_logits(logits, extras, penalties)
    tokens = sample(processed, tensors)
    record_sampled(penalties, extras, tokens)
    logprobs = None if extras.logprobs is None else compute_logprobs(processed, tokens, extras.logprobs)
    return tokens, logprobs
