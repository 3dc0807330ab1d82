"""Shared memory that loader workers write batches into and reuse, instead of fresh shared memory per batch.

A tensor a DataLoader worker returns reaches the main process through shared memory, and by
default every batch gets new shared memory whose pages are then touched for the first time. On
the 16-vCPU GPU host that first touch, by 16 workers at once, cost more than drawing and
augmenting the patches: with ready-made patches 16 workers handed over only 80 bf16 batches/s,
200 ms of worker time per batch (benchmarks/results/h200_v4/loader_speed_fresh_shm_d718447.json, transport_only).
Here each worker keeps a few sets of buffers and copies the batches of successive groups into
them in turn; sending a buffer again only sends its handle.

Why ``GROUPS_AHEAD + 1`` sets suffice: a worker holds at most ``GROUPS_AHEAD`` groups to make
(the DataLoader's prefetch factor), and it is given a new one only when the main process takes in
a group (one new task per group taken, workers served in turn). So the set a group was written
into is written again only after the main process has taken in that group and the next
``GROUPS_AHEAD - 1`` of the same worker; by then it has copied the group out of shared memory:
pinned copies made by the DataLoader's pin thread before a group is taken in, or clones made as
soon as it is taken in (:class:`~nnmamba.data.sampling.PatchBatchLoader`).
"""

from __future__ import annotations

from typing import Any

import torch

# Groups each worker may be making ahead of the main process: with one, a worker that finished
# waited until the groups before its own had arrived from slower workers.
GROUPS_AHEAD = 2
TURNS = GROUPS_AHEAD + 1


class WorkerBatchBuffers:
    """One worker's buffers: per turn, per batch position and per key, a shared tensor of the batch's shape."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[int, int, str], torch.Tensor] = {}
        self.turn = 0

    def stage(self, batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The batches with every tensor copied into this turn's buffers (made on first use or a new shape)."""
        turn, self.turn = self.turn, (self.turn + 1) % TURNS
        return [{key: self._copy_in(turn, position, key, value) if isinstance(value, torch.Tensor) else value
                 for key, value in batch.items()}
                for position, batch in enumerate(batches)]

    def _copy_in(self, turn: int, position: int, key: str, value: torch.Tensor) -> torch.Tensor:
        buffer = self.buffers.get((turn, position, key))
        if buffer is None or buffer.shape != value.shape or buffer.dtype != value.dtype:
            buffer = torch.empty_like(value, memory_format=torch.contiguous_format).share_memory_()
            self.buffers[turn, position, key] = buffer
        return buffer.copy_(value)


_THIS_WORKER: WorkerBatchBuffers | None = None


def worker_batch_buffers() -> WorkerBatchBuffers:
    """This worker process's buffers (each forked worker gets its own on first use)."""
    global _THIS_WORKER
    if _THIS_WORKER is None:
        _THIS_WORKER = WorkerBatchBuffers()
    return _THIS_WORKER
