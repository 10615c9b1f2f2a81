"""CUDA graphs of the decode forward, one per batch-size bucket, replayed with static input buffers.

A decode step of B sequences launches a few hundred small kernels (every layer's norms,
projections, rotary embedding, KV store and paged attention); launched one by one from Python
they cost far more than the work itself. Captured once per bucket, the whole forward (all
layers, attention included) replays with one launch. Each step copies its inputs into the static
buffers (token ids, positions, slot mapping, block tables, context lengths) and pads the batch
to the next bucket with rows that store nothing (slot -1) and read nothing (length 0).
All buckets share one memory pool, captured largest first (as vLLM and nano-vllm do).
"""

from __future__ import annotations

import time
from typing import Any

import structlog
import torch

from worker.engine.attention import AttentionMetadata, attention_context
from worker.engine.block_table_rows import BlockTableRows
from worker.engine.kernels import num_decode_splits
from worker.engine.kv_cache import KVCache

log = structlog.get_logger(__name__)


def decode_buckets(max_num_seqs: int) -> list[int]:
    """Batch sizes captured: 1, 2, 4, 8, then steps of 8 to 64 and of 16 beyond, ending at max_num_seqs."""
    sizes = [b for b in (1, 2, 4, 8) if b < max_num_seqs]
    sizes += list(range(16, min(max_num_seqs, 64) + 1, 8))
    sizes += list(range(80, max_num_seqs + 1, 16))
    sizes = [b for b in sizes if b < max_num_seqs]
    return sorted(set(sizes + [max_num_seqs]))


def bucket_for(batch_size: int, buckets: list[int]) -> int | None:
    """The smallest bucket holding `batch_size` rows, or None if it exceeds the largest."""
    return next((b for b in buckets if b >= batch_size), None)


class DecodeGraphs:
    """Captured decode forwards keyed by bucket; `run` fills the buffers, replays, returns logits."""

    def __init__(self, model: Any, kv_cache: KVCache, max_num_seqs: int, max_blocks_per_seq: int):
        self.model = model
        self.kv_cache = kv_cache
        self.device = kv_cache.device
        self.buckets = decode_buckets(max_num_seqs)
        n = self.buckets[-1]
        # Host staging rows padded to a bucket; device buffers the graphs read.
        self.input_ids = torch.zeros(n, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(n, dtype=torch.long, device=self.device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.long, device=self.device)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=self.device)
        self.block_tables = torch.zeros(n, max_blocks_per_seq, dtype=torch.int32, device=self.device)
        self.max_blocks_per_seq = max_blocks_per_seq
        self.host_tables = BlockTableRows(n, max_blocks_per_seq)  # rewritten by difference each step
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.pool: Any = None

    def _metadata(self, bucket: int) -> AttentionMetadata:
        num_sms = torch.cuda.get_device_properties(self.device).multi_processor_count
        return AttentionMetadata(
            kv_cache=self.kv_cache,
            backend="triton",
            slot_mapping=self.slot_mapping[:bucket],
            block_tables=self.block_tables[:bucket],
            context_lens=self.context_lens[:bucket],
            num_decodes=bucket,
            query_start_loc=self.context_lens[:1],  # unused: no prefill rows
            max_query_len=0,
            decode_splits=num_decode_splits(bucket, self.kv_cache.spec.num_kv_heads, num_sms),
        )

    def _forward(self, bucket: int, metadata: AttentionMetadata) -> torch.Tensor:
        with attention_context(metadata):
            out = self.model(
                input_ids=self.input_ids[None, :bucket],
                position_ids=self.positions[None, :bucket],
                use_cache=False,
                logits_to_keep=0,
            )
        return out.logits[0]

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket (largest first, sharing one pool); the buffers hold padding meanwhile."""
        start = time.perf_counter()
        self.slot_mapping.fill_(-1)
        self.context_lens.zero_()
        self.pool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.buckets):
            metadata = self._metadata(bucket)
            self._forward(bucket, metadata)  # warm-up: compiles kernels, settles allocations
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.logits[bucket] = self._forward(bucket, metadata)
            self.graphs[bucket] = graph
        torch.cuda.synchronize(self.device)
        log.info(
            "cuda_graphs_captured", buckets=len(self.buckets), max_batch=self.buckets[-1],
            seconds=round(time.perf_counter() - start, 2),
        )  # fmt: skip

    def run(
        self, input_ids: list[int], positions: list[int], slots: list[int], context_lens: list[int],
        block_tables: list[list[int]], future: tuple[list[tuple[int, int]], torch.Tensor] | None = None,
        evictions: list[int] | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """Replay the bucket holding these decode rows; returns their logits [rows, vocab] (a view).

        `future`: (row, index) pairs and a device tensor of token ids: those rows' input ids are taken
        from it on the device (the previous step's sampled ids, not read back yet).
        """
        rows = len(input_ids)
        bucket = bucket_for(rows, self.buckets)
        if bucket is None:
            raise ValueError(f"{rows} decode rows exceed the largest captured bucket {self.buckets[-1]}")
        width = self.host_tables.update(block_tables, evictions or [0] * rows)
        # From pageable memory: the copy is staged before `copy_` returns, so the next step may rewrite
        # the array while this one waits in the device's queue (async scheduling).
        tables = torch.from_numpy(self.host_tables.array[:rows, :width])
        pad = bucket - rows
        host = torch.tensor(
            [input_ids + [0] * pad, positions + [0] * pad, slots + [-1] * pad, context_lens + [0] * pad],
            dtype=torch.long,
        )
        self.input_ids[:bucket].copy_(host[0], non_blocking=True)
        self.positions[:bucket].copy_(host[1], non_blocking=True)
        self.slot_mapping[:bucket].copy_(host[2], non_blocking=True)
        self.context_lens[:bucket].copy_(host[3], non_blocking=True)
        self.block_tables[:rows, :width].copy_(tables, non_blocking=True)
        if future is not None:
            pairs, tokens = future
            index = torch.tensor(pairs, dtype=torch.long).T.to(self.device, non_blocking=True)
            self.input_ids[index[0]] = tokens[index[1]]
        self.graphs[bucket].replay()
        return self.logits[bucket][:rows]
