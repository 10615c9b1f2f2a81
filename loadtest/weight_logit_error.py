"""Teacher-forced logit error of INT8 weight variants against the FP32 model, per part quantised.

Greedy agreement over 64 chat prompts (`kv_quality.py`) is a coarse measure: one flipped near-tie
changes a whole answer. This scores every position of the perplexity text instead: each variant and
the FP32 model run the same windows (a plain transformers forward, no engine, no KV format), and at
every position it reports whether the argmax matches FP32's (`top1`), the KL divergence
KL(FP32 || variant) in nats, and the perplexity. The variants separate what each part costs:

  linears           every nn.Linear but lm_head INT8 (`quantize_linears`)
  linears+lookup    and the embedding an `Int8Embedding`; lm_head float (untied from the table)
  linears+lm_head   and lm_head an `Int8Linear`; the embedding lookup float
  int8              LLM_WEIGHTS=int8: linears, and one INT8 table for the lookup and lm_head

    python loadtest/weight_logit_error.py --threads 1 \
        --json-out docs/bench/cpu_weight_logit_error.json
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "loadtest"))

from kv_quality import TEXT, commit, machine  # noqa: E402

from worker.engine.model_files import DEFAULT_MODEL  # noqa: E402
from worker.engine.model_loader import load_model  # noqa: E402
from worker.engine.quant import Int8Embedding, Int8Linear, quantize_linears, quantize_model  # noqa: E402


def variant(model: Any, name: str) -> Any:
    """A quantised copy of `model` (FP32, tied) for one variant of the module doc."""
    model = copy.deepcopy(model)
    if name == "int8":
        quantize_model(model)
        return model
    quantize_linears(model)
    if name == "linears+lookup":
        model.model.embed_tokens = Int8Embedding.from_embedding(model.model.embed_tokens)
    elif name == "linears+lm_head":
        model.lm_head = Int8Linear.from_linear(model.lm_head)
    elif name != "linears":
        raise ValueError(name)
    return model


@torch.inference_mode()
def logits_of(model: Any, window: list[int]) -> torch.Tensor:
    return model(input_ids=torch.tensor([window])).logits[0, :-1].float()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--variants", default="linears,linears+lookup,linears+lm_head,int8")
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--windows", type=int, default=0, help="first N windows of the text (0: all)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = {"commit": commit(), "machine": machine()}
    loaded = load_model(args.model, device="cpu", dtype="float32")
    ids = loaded.tokenizer.encode(TEXT.read_text(encoding="utf-8"), add_special_tokens=False)
    windows = [ids[i : i + args.window] for i in range(0, len(ids) - args.window + 1, args.window)]
    windows = windows[: args.windows] if args.windows else windows
    reference = [logits_of(loaded.model, w) for w in windows]
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    rows: list[dict[str, Any]] = []
    for name in ["fp32", *names]:
        model = loaded.model if name == "fp32" else variant(loaded.model, name)
        agree = kl = nll = 0.0
        count = 0
        for window, ref in zip(windows, reference, strict=True):
            logits = ref if name == "fp32" else logits_of(model, window)
            targets = torch.tensor(window[1:])
            ref_logp, logp = F.log_softmax(ref, -1), F.log_softmax(logits, -1)
            agree += float((logits.argmax(-1) == ref.argmax(-1)).sum())
            kl += float((ref_logp.exp() * (ref_logp - logp)).sum())
            nll += float(F.cross_entropy(logits, targets, reduction="sum"))
            count += len(targets)
        rows.append(
            {"variant": name, "positions": count, "top1": agree / count, "kl": kl / count,
             "ppl": math.exp(nll / count)}
        )  # fmt: skip
        ppl = math.exp(nll / count)
        print(f"{name:16s} top1 {agree / count * 100:6.2f}%  KL {kl / count:.5f}  PPL {ppl:.3f}", flush=True)
        if model is not loaded.model:
            del model
    meta = {
        "command": "python " + " ".join(sys.argv if argv is None else [sys.argv[0], *argv]),
        **started, "model": args.model, "text": TEXT.name, "window": args.window,
        "windows": len(windows), "threads": torch.get_num_threads(),
    }  # fmt: skip
    print(json.dumps(meta))
    if args.json_out:
        args.json_out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
