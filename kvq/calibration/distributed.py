"""Data-parallel calibration on torch.distributed (``torchrun --nproc-per-node N -m kvq calibrate ...``).

Every rank loads the model (with its own device map, if any), takes every N-th of the selected
samples (rank r: samples r, r + N, ...), folds them into its own statistics, and the ranks reduce
them: MIN of the minima, MAX of the maxima, SUM of the token counts, in float32 / int64. min and max
are exact in any order, so the result equals one process over the same samples bit for bit,
whatever N. Rank 0 writes the artifacts; the others write nothing. A failure on any rank is shared
(:func:`agree`): every rank then stops with the same one-line message, and nothing is written.
gloo serves the CPU, NCCL the GPUs; multi-node runs come from torchrun's rendezvous as they are.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch

from kvq.artifacts.stats import KVStats
from kvq.errors import KvqError, UsageError
from kvq.model.model_spec import KVShape
from kvq.quant.histogram import NUM_BINS


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0  # this rank's index on its node
    local_size: int = 1  # ranks on this node

    @property
    def is_writer(self) -> bool:
        return self.rank == 0


def world(device: torch.device) -> World:
    """This process's place in a torchrun launch (set up once); one process when not launched by torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":  # NCCL reduces on the rank's first GPU
            torch.cuda.set_device(local_rank * max(torch.cuda.device_count() // local_size, 1))
        dist.init_process_group(backend, timeout=timedelta(minutes=30))
    return World(dist.get_rank(), dist.get_world_size(), local_rank, local_size)


def rank_max_memory(w: World, gpus: int, max_memory: dict[int | str, str | int] | None
                    ) -> dict[int | str, str | int] | None:
    """The devices a rank's device map may use: its own equal share of the node's GPUs (and the CPU).

    Without this every rank would place its copy of the model on every GPU. ``max_memory`` (parsed
    --max-memory) keeps its sizes for the rank's GPUs and the CPU; without it the rank's GPUs get
    accelerate's defaults. None when there is nothing to split (one process, or no GPU).
    """
    if w.size == 1 or gpus == 0:
        return max_memory
    if gpus % w.local_size:
        raise UsageError(f"{gpus} GPUs on this node cannot be split evenly over its {w.local_size} ranks",
                         hint="use a --nproc-per-node that divides the GPU count")
    per = gpus // w.local_size
    own = range(w.local_rank * per, (w.local_rank + 1) * per)
    if max_memory is None:
        from accelerate.utils import get_max_memory

        max_memory = dict(get_max_memory())  # bytes per device, as accelerate measures them
    return {k: v for k, v in max_memory.items() if not isinstance(k, int) or k in own}


def shard(items: list, w: World) -> list:
    """This rank's share: every ``w.size``-th item from ``w.rank`` on."""
    return items[w.rank :: w.size]


def agree(w: World, failure: BaseException | None) -> None:
    """Every rank learns whether any failed; all raise (the failed rank its own error) if one did."""
    if w.size == 1:
        if failure is not None:
            raise failure
        return
    import torch.distributed as dist

    failed = torch.tensor([w.rank if failure is not None else -1], dtype=torch.int64)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if failure is not None:
        raise failure
    if int(failed) >= 0:
        raise KvqError(f"rank {int(failed)} of {w.size} failed (its message is above); no artifact is written")


def reduce_stats(stats: KVStats, shape: KVShape, w: World, histograms: str | None = None) -> KVStats:
    """The statistics of every rank's samples, on every rank (layers a rank did not observe count as empty);
    histograms ("head" / "channel", as every rank recorded them) are summed. Each layer's K and V at its own
    (heads, dim) (``shape.of(i)``), packed into one flat buffer per reduction."""
    if w.size == 1:
        return stats
    import torch.distributed as dist

    parts = [(i, j, shape.of(i).of(which)) for i in range(shape.num_layers) for j, which in enumerate("kv")]
    hist_of = {None: lambda h, d: None, "head": lambda h, d: (h, NUM_BINS), "channel": lambda h, d: (h, d, NUM_BINS)}
    sizes = [h * d for _, _, (h, d) in parts]
    hist_shapes = [hist_of[histograms](h, d) for _, _, (h, d) in parts]
    hist_sizes = [0 if hs is None else math.prod(hs) for hs in hist_shapes]
    starts, hist_starts = _offsets(sizes), _offsets(hist_sizes)
    mins = torch.full((sum(sizes),), float("inf"), dtype=torch.float32)
    maxs = torch.full((sum(sizes),), float("-inf"), dtype=torch.float32)
    tokens = torch.zeros(shape.num_layers, dtype=torch.int64)
    counts = None if histograms is None else torch.zeros(sum(hist_sizes), dtype=torch.int64)
    for n, (i, j, _) in enumerate(parts):
        layer = stats.layers.get(i)
        if layer is None:
            continue
        ts = (layer.k, layer.v)[j]
        mins[starts[n]:starts[n] + sizes[n]] = ts.min.cpu().reshape(-1)
        maxs[starts[n]:starts[n] + sizes[n]] = ts.max.cpu().reshape(-1)
        if counts is not None:
            counts[hist_starts[n]:hist_starts[n] + hist_sizes[n]] = ts.hist.reshape(-1)
        tokens[i] = layer.tokens
    if dist.get_backend() == "nccl":  # NCCL reduces CUDA tensors only
        device = torch.device("cuda", torch.cuda.current_device())
        mins, maxs, tokens = mins.to(device), maxs.to(device), tokens.to(device)
        counts = None if counts is None else counts.to(device)
    dist.all_reduce(mins, op=dist.ReduceOp.MIN)
    dist.all_reduce(maxs, op=dist.ReduceOp.MAX)
    dist.all_reduce(tokens, op=dist.ReduceOp.SUM)
    if counts is not None:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        counts = counts.cpu()
    mins, maxs, tokens = mins.cpu(), maxs.cpu(), tokens.cpu()

    def piece(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        (h, d), at = parts[n][2], starts[n]
        hist = None if counts is None else counts[hist_starts[n]:hist_starts[n] + hist_sizes[n]].reshape(hist_shapes[n])
        return mins[at:at + sizes[n]].reshape(h, d), maxs[at:at + sizes[n]].reshape(h, d), hist

    out = KVStats(metadata=dict(stats.metadata))
    for i in range(shape.num_layers):
        if int(tokens[i]) > 0:
            (k_min, k_max, k_hist), (v_min, v_max, v_hist) = piece(2 * i), piece(2 * i + 1)
            out.observe(i, k_min, k_max, v_min, v_max, int(tokens[i]), k_hist, v_hist)
    return out


def _offsets(sizes: list[int]) -> list[int]:
    """Where each of ``sizes`` starts in their concatenation."""
    return [0, *itertools.accumulate(sizes)][:len(sizes)]
