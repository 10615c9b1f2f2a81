"""Token sampling per request: greedy, temperature, top-k, top-p, with per-request seeds.

Each seeded request owns a `torch.Generator`, so its samples depend only on its own
seed and step, never on which other requests share the batch.
"""

from __future__ import annotations

import torch

from worker.engine.base import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A private RNG for a seeded request; None for greedy or unseeded sampling."""
    if params.temperature == 0 or params.seed is None:
        return None
    gen = torch.Generator(device=device)
    gen.manual_seed(params.seed)
    return gen


def sample_next_tokens(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """Pick one token per row of `logits` ([batch, vocab]) under each row's parameters."""
    greedy = torch.argmax(logits, dim=-1).tolist()
    out: list[int] = []
    for row, (p, gen) in enumerate(zip(params, generators, strict=True)):
        if p.temperature == 0:
            out.append(int(greedy[row]))
            continue
        scores = logits[row].float() / p.temperature
        if p.top_k > 0:
            kth = torch.topk(scores, min(p.top_k, scores.shape[-1])).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(-1)
            # Drop tokens once the mass before them already reaches top_p (keep at least one).
            drop = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= p.top_p
            sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
            scores = torch.full_like(scores, float("-inf")).scatter(0, order, sorted_scores)
        probs = torch.softmax(scores, dim=-1)
        out.append(int(torch.multinomial(probs, 1, generator=gen).item()))
    return out
