"""INT8 KV cache variants on SmolLM2's real keys and values: reconstruction error and greedy agreement.

Measures, on CPU with the FP32 model and the torch attention backend, how ways of quantising a K or
V vector to INT8 compare (the engine's INT8 cache is `hadamard`, `quant/kv_int8.py`; the study was
run before it was, against `sym`, the format it replaced):

  sym           the former format: symmetric, one FP16 scale per token per KV head, `max |x| / 127`.
  hadamard      the engine's format: the vector is first rotated by the normalised 64x64 Hadamard
                matrix H (x -> x H, as QuaRot does), then quantised as `sym`. H is orthonormal, so
                q.k = (q H).(k H) and softmax(.) V = (softmax(.) V H) H^T: the kernels rotate the query
                and un-rotate the attention output instead of un-rotating every K/V they read. Same
                bytes as `sym`.
  asym          per token per head with an FP16 scale and an FP16 zero point (the midpoint of the
                vector's min and max): `q = round((x - mid) / ((max - min) / 254))`. Two bytes more
                per vector (1.88x the blocks of FP16 instead of 1.94x at head_dim 64).
  hadamard-asym both: rotated, then asymmetric.
  hadamard-rs   as `hadamard` with H's rows multiplied by fixed random signs (diag(+-1) H, seed 0:
                QuaRot's randomised Hadamard); as cheap in a kernel as `hadamard`.
  k-smooth      K only (V as `sym`): each channel divided by a fixed vector s before quantising and
                multiplied back after (the query would carry s instead), s derived from the weights
                alone: the norm of each row of k_proj's weight with the input RMSNorm's gain folded
                in, the two channels a RoPE rotation mixes (c and c + D/2) given their common RMS so
                that s commutes with RoPE, s = that ^ 0.5 (SmoothQuant's alpha). No calibration.
  k-smooth-cal  the same with s from the captured keys' own per-channel RMS: calibrated on the very
                prompts it is scored on, so an upper bound for per-channel smoothing, not a candidate.

Steps:
  1. Capture: the FP32 engine generates 16 greedy tokens for each of the 8 chat prompts of
     `tests/engine/test_kv_int8.py` (`CHAT_PROMPTS`); every K (after RoPE) and V written into the
     cache is recorded (prompt and generated tokens, all 30 layers).
  2. Reconstruction error of each variant on those vectors: ||x - dq(q(x))|| / ||x|| over all of a
     layer's tokens and heads (Frobenius), printed per layer for K and V with a min/median/max/all
     summary.
  3. End to end, each variant simulated in the engine's own cache writes (the K/V that reach an FP32
     cache are quantised and dequantised with the variant first, so every later read sees exactly
     the variant's values): (a) greedy agreement with the FP32 engine over 16 tokens on the 8
     prompts (identical prompts, common prefixes, prompts sharing the first 8 tokens); (b) teacher
     forced, each prompt followed by the FP32 engine's 16 tokens is prefilled once and the 16 logit
     rows that predicted them are compared with the FP32 engine's: mean KL(FP32 || variant), RMS
     logit error, and how many of the 128 argmaxes flip.
  4. With `--engine`, the same measures through the engine's real INT8 cache
     (`PagedEngine(kv_dtype="int8")`, rotated by H), to check it against its simulation.

Run (about 3 minutes on one core of the 2-core dev machine):

    HF_HUB_OFFLINE=1 python loadtest/kv_rotation_study.py --threads 1 --json-out /tmp/kv_rotation.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# The prompts and greedy helpers of the engine tests, so this measures exactly what test_kv_int8.py does.
sys.path.insert(0, str(ROOT / "tests" / "engine"))

from engine_helpers import (  # noqa: E402
    CHAT_PROMPTS,
    chat,
    common_prefix,
    greedy_tokens,
    teacher_forced_logits,
)

from worker.engine.kv_cache import KVCache  # noqa: E402
from worker.engine.llm_engine import PagedEngine  # noqa: E402
from worker.engine.model_loader import LoadedModel, load_model  # noqa: E402
from worker.engine.quant.kv_int8 import (  # noqa: E402
    KV_QMAX,
    KV_SCALE_DTYPE,
    KV_SCALE_MAX,
    KV_SCALE_MIN,
    dequantize_kv,
    hadamard_matrix,
    quantize_kv,
    round_half_away,
)
from worker.settings import WorkerSettings  # noqa: E402

NEW_TOKENS = 16
KV_CACHE_BYTES = 32 << 20

Roundtrip = Callable[[torch.Tensor], torch.Tensor]  # [T, kv_heads, D] -> the same, quantised and back


def sym(x: torch.Tensor) -> torch.Tensor:
    q, scale = quantize_kv(x)
    return dequantize_kv(q, scale, torch.float32)


def asym(x: torch.Tensor) -> torch.Tensor:
    """FP16 scale and FP16 midpoint per vector; levels -127..127 around the midpoint."""
    xf = x.float()
    hi, lo = xf.amax(-1), xf.amin(-1)
    mid = ((hi + lo) / 2).to(KV_SCALE_DTYPE).float()
    # The range around the stored (rounded) midpoint, so the extremes still fit in +-127 steps.
    half = torch.maximum(hi - mid, mid - lo)
    scale = (half / KV_QMAX).clamp(KV_SCALE_MIN, KV_SCALE_MAX).to(KV_SCALE_DTYPE).float()
    q = round_half_away((xf - mid[..., None]) / scale[..., None]).clamp(-KV_QMAX, KV_QMAX)
    return q * scale[..., None] + mid[..., None]


def rotated(inner: Roundtrip, random_signs: bool = False) -> Roundtrip:
    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        h = hadamard_matrix(x.shape[-1], torch.float32, x.device, random_signs)
        return inner(x.float() @ h) @ h.T

    return roundtrip


def smoothed(inner: Roundtrip, s: torch.Tensor) -> Roundtrip:
    """`s` [kv_heads, D]: quantise x / s, multiply back by s."""

    def roundtrip(x: torch.Tensor) -> torch.Tensor:
        return inner(x.float() / s) * s

    return roundtrip


def rope_paired(m: torch.Tensor) -> torch.Tensor:
    """[..., D] per-channel magnitudes -> the RMS of each RoPE pair (c, c + D/2), given to both."""
    half = m.shape[-1] // 2
    pair = ((m[..., :half] ** 2 + m[..., half:] ** 2) / 2).sqrt()
    return torch.cat([pair, pair], -1)


def smoothing_from_weights(model: Any, alpha: float = 0.5) -> list[torch.Tensor]:
    """Per layer [kv_heads, D]: (row norms of k_proj with the input norm's gain folded in) ^ alpha."""
    out = []
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    for layer in model.model.layers:
        w = layer.self_attn.k_proj.weight.float() * layer.input_layernorm.weight.float()[None, :]
        m = rope_paired(w.norm(dim=1).view(-1, head_dim))
        s = m**alpha
        out.append(s / s.log().mean(-1, keepdim=True).exp())
    return out


def smoothing_calibrated(keys: list[torch.Tensor], alpha: float = 0.5) -> list[torch.Tensor]:
    """Per layer [kv_heads, D] from the captured keys' per-channel RMS (an upper bound, not a candidate)."""
    out = []
    for k in keys:
        s = rope_paired(k.float().pow(2).mean(0).sqrt()) ** alpha
        out.append(s / s.log().mean(-1, keepdim=True).exp())
    return out


def make_variants(model: Any, keys: list[torch.Tensor]) -> dict[str, tuple[list[Roundtrip], Roundtrip]]:
    """name -> (K roundtrip per layer, V roundtrip)."""
    n = len(keys)
    w_s, cal_s = smoothing_from_weights(model), smoothing_calibrated(keys)
    return {
        "sym": ([sym] * n, sym),
        "hadamard": ([rotated(sym)] * n, rotated(sym)),
        "asym": ([asym] * n, asym),
        "hadamard-asym": ([rotated(asym)] * n, rotated(asym)),
        "hadamard-rs": ([rotated(sym, True)] * n, rotated(sym, True)),
        "k-smooth": ([smoothed(sym, s) for s in w_s], sym),
        "k-smooth-cal": ([smoothed(sym, s) for s in cal_s], sym),
    }


class CacheWrites:
    """Patches `KVCache.write` for a block: records what is written, or replaces K/V by a variant's."""

    def __init__(self) -> None:
        self.keys: dict[int, list[torch.Tensor]] = {}
        self.values: dict[int, list[torch.Tensor]] = {}
        self.k_roundtrip: list[Roundtrip] | None = None
        self.v_roundtrip: Roundtrip | None = None
        self._original = KVCache.write

    def __enter__(self) -> CacheWrites:
        writes = self

        def write(
            cache: KVCache, layer_idx: int, slots: torch.Tensor, key: torch.Tensor, value: torch.Tensor
        ):
            if writes.k_roundtrip is not None and writes.v_roundtrip is not None:
                key = writes.k_roundtrip[layer_idx](key).to(key.dtype)
                value = writes.v_roundtrip(value).to(value.dtype)
            else:
                writes.keys.setdefault(layer_idx, []).append(key.detach().clone())
                writes.values.setdefault(layer_idx, []).append(value.detach().clone())
            writes._original(cache, layer_idx, slots, key, value)

        KVCache.write = write  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        KVCache.write = self._original  # type: ignore[method-assign]


def fp32_engine(loaded: LoadedModel, **options: Any) -> PagedEngine:
    return PagedEngine(
        loaded.model, loaded.tokenizer, kv_cache_bytes=KV_CACHE_BYTES, attention_backend="torch", **options
    )


def rel_error(x: torch.Tensor, back: torch.Tensor) -> float:
    return ((back.float() - x.float()).norm() / x.float().norm()).item()


def compare_logits(ref: torch.Tensor, got: torch.Tensor) -> dict[str, Any]:
    logp_ref, logp_got = ref.log_softmax(-1), got.log_softmax(-1)
    kl = (logp_ref.exp() * (logp_ref - logp_got)).sum(-1)
    top2 = ref.topk(2, dim=-1).values
    margins = top2[..., 0] - top2[..., 1]
    flips = ref.argmax(-1) != got.argmax(-1)
    return {
        "mean_kl": kl.mean().item(),
        "rms_logit_err": (got - ref).pow(2).mean().sqrt().item(),
        "argmax_flips": int(flips.sum()),
        "flip_margins": [round(m, 3) for m in margins[flips].tolist()],
    }


def agreement(ref: list[list[int]], got: list[list[int]]) -> dict[str, Any]:
    prefixes = [common_prefix(a, b) for a, b in zip(ref, got, strict=True)]
    return {
        "identical_16": sum(p == NEW_TOKENS for p in prefixes),
        "first_8": sum(p >= 8 for p in prefixes),
        "prefixes": prefixes,
        "token_share": sum(prefixes) / (NEW_TOKENS * len(prefixes)),
    }


def print_error_table(errors: dict[str, dict[str, list[float]]]) -> None:
    names = list(errors)
    for kind in ("K", "V"):
        print(f"\nRelative reconstruction error of {kind} per layer (%):")
        print("layer " + " ".join(f"{n:>14}" for n in names))
        num_layers = len(errors[names[0]][kind])
        for layer in range(num_layers):
            print(f"{layer:>5} " + " ".join(f"{errors[n][kind][layer] * 100:>14.3f}" for n in names))
        for label, fn in (("min", min), ("median", statistics.median), ("max", max)):
            print(f"{label:>6}" + " ".join(f"{fn(errors[n][kind]) * 100:>14.3f}" for n in names))
        print(f"{'all':>6}" + " ".join(f"{errors[n][kind + '_all'] * 100:>14.3f}" for n in names))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--variants", default="", help="comma-separated subset of the variants (default all)")
    parser.add_argument("--engine", action="store_true", help="also run the engine's own INT8 cache")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.monotonic()
    loaded = load_model(device="cpu", dtype="float32")

    # 1. Capture K/V and the FP32 engine's tokens.
    engine = fp32_engine(loaded)
    prompts = [chat(engine, p) for p in CHAT_PROMPTS]
    with CacheWrites() as writes:
        baseline = greedy_tokens(engine, CHAT_PROMPTS, NEW_TOKENS)
    engine.close()
    ref_logits = teacher_forced_logits(fp32_engine(loaded, enable_prefix_caching=False), prompts, baseline)
    num_layers = len(writes.keys)
    keys = [torch.cat(writes.keys[i]) for i in range(num_layers)]
    values = [torch.cat(writes.values[i]) for i in range(num_layers)]
    print(f"captured {keys[0].shape[0]} tokens x {num_layers} layers, K/V {tuple(keys[0].shape[1:])}")
    h = hadamard_matrix(keys[0].shape[-1])
    for kind, vectors in (("K", keys), ("V", values)):
        for label, rotation in (("", torch.eye(h.shape[0])), (" after H", h)):
            x = torch.cat(vectors).float() @ rotation
            peak = x.abs().amax(-1) / x.pow(2).mean(-1).sqrt()
            print(f"{kind}{label}: largest element / RMS, median {peak.median():.2f}, max {peak.max():.2f}")

    variants = make_variants(loaded.model, keys)
    if args.variants:
        variants = {n: variants[n] for n in args.variants.split(",")}

    # 2. Reconstruction error.
    errors: dict[str, dict[str, Any]] = {}
    for name, (k_rt, v_rt) in variants.items():
        k_back = [k_rt[i](keys[i]) for i in range(num_layers)]
        v_back = [v_rt(values[i]) for i in range(num_layers)]
        errors[name] = {
            "K": [rel_error(keys[i], k_back[i]) for i in range(num_layers)],
            "V": [rel_error(values[i], v_back[i]) for i in range(num_layers)],
            "K_all": rel_error(torch.cat(keys), torch.cat(k_back)),
            "V_all": rel_error(torch.cat(values), torch.cat(v_back)),
        }
    print_error_table(errors)

    # 3. End to end through the engine, each variant simulated in the cache writes.
    results: dict[str, Any] = {}
    print(f"\n{'variant':>23} {'identical/8':>11} {'first8/8':>8} {'tokens':>7} {'KL':>9} {'RMS dlogit':>10} "
          f"{'flips/128':>9}  prefixes; FP32 margins at flips")  # fmt: skip
    for name, (k_rt, v_rt) in variants.items():
        engine = fp32_engine(loaded)
        with CacheWrites() as writes:
            writes.k_roundtrip, writes.v_roundtrip = k_rt, v_rt
            tokens = greedy_tokens(engine, CHAT_PROMPTS, NEW_TOKENS)
            engine.close()
            logits = teacher_forced_logits(
                fp32_engine(loaded, enable_prefix_caching=False), prompts, baseline
            )
        results[name] = {
            **agreement(baseline, tokens),
            **compare_logits(ref_logits, logits),
            "tokens": tokens,
        }
        print_result(name, results[name])

    # 4. The engine's real INT8 cache: with PagedEngine's defaults as the FP32 baseline above, and with
    # the worker's admission policy as test_kv_int8.py's INT8 engine (built by create_engine from
    # WorkerSettings: a 4096-token step, 32 sequences, a 10 ms window).
    engine_results: dict[str, Any] = {}
    for config, options in (("", {}), ("worker:", {"policy": WorkerSettings().batch_policy()})):
        if not args.engine:
            break
        engine = fp32_engine(loaded, kv_dtype="int8", **options)
        tokens = greedy_tokens(engine, CHAT_PROMPTS, NEW_TOKENS)
        engine.close()
        result: dict[str, Any] = {**agreement(baseline, tokens), "tokens": tokens}
        if not config:
            tf_engine = fp32_engine(loaded, enable_prefix_caching=False, kv_dtype="int8")
            result.update(compare_logits(ref_logits, teacher_forced_logits(tf_engine, prompts, baseline)))
        engine_results[config + "int8"] = result
        print_result(f"engine:{config}int8", result)
    print(f"\n{time.monotonic() - t0:.0f} s")
    if args.json_out:
        args.json_out.write_text(
            json.dumps(
                {"errors": errors, "simulated": results, "engine": engine_results, "baseline": baseline},
                indent=1,
            )
        )
    return 0


def print_result(name: str, r: dict[str, Any]) -> None:
    logits = (
        f"{r['mean_kl']:>9.2e} {r['rms_logit_err']:>10.4f} {r['argmax_flips']:>9}"
        if "mean_kl" in r
        else f"{'-':>9} {'-':>10} {'-':>9}"
    )
    print(
        f"{name:>23} {r['identical_16']:>11} {r['first_8']:>8} {r['token_share']:>7.1%} {logits}  "
        f"{r['prefixes']}; {r.get('flip_margins', '')}"
    )


if __name__ == "__main__":
    sys.exit(main())
