"""Shared memory that loader workers write batches into and reuse, instead of fresh shared memory per batch.

A tensor a DataLoader worker returns reaches the main process through shared memory, and by
default every batch is stacked into new shared memory, whose pages the kernel then allocates and
zeroes on first touch, for every worker at once. Here each worker keeps a few sets of buffers and
stacks the batches of successive groups into them in turn; sending a buffer again only sends its
handle. The stacking and hand-over cost is what ``benchmarks/loader_speed.py --transport-only``
measures.

Why ``GROUPS_AHEAD + 1`` sets suffice: a worker holds at most ``GROUPS_AHEAD`` groups to make
(the DataLoader's prefetch factor), and it is given a new one only when the main process takes in
a group (one new task per group taken, workers served in turn). So the set a group was written
into is written again only after the main process has taken in that group and the next
``GROUPS_AHEAD - 1`` of the same worker; by then it has copied the group out of shared memory:
pinned copies made by the DataLoader's pin thread before a group is taken in, or clones made as
soon as it is taken in (:class:`~nnmamba.data.loading.sampling.PatchBatchLoader`).
"""

from __future__ import annotations

import torch

# Groups each worker may be making ahead of the main process: with one, a worker that finished
# waited until the groups before its own had arrived from slower workers.
GROUPS_AHEAD = 2
TURNS = GROUPS_AHEAD + 1


class WorkerBatchBuffers:
    """One worker's buffers, one per turn, batch position in the group and stacked tensor of the batch."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[int, int, str], torch.Tensor] = {}
        self.turn = TURNS - 1

    def next_turn(self) -> int:
        """The set of buffers the next group goes to."""
        self.turn = (self.turn + 1) % TURNS
        return self.turn

    def stack(self, turn: int, position: int, name: str, tensors: list[torch.Tensor],
              dtype: torch.dtype) -> torch.Tensor:
        """``tensors`` stacked, as ``dtype``, into the buffer of batch field ``name`` at this turn and position
        of the group (made on first use, or for a new shape or type)."""
        slot = (turn, position, name)
        shape = (len(tensors), *tensors[0].shape)
        buffer = self.buffers.get(slot)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
            buffer = torch.empty(shape, dtype=dtype).share_memory_()
            self.buffers[slot] = buffer
        return torch.stack(tensors, out=buffer)


_THIS_WORKER: WorkerBatchBuffers | None = None


def worker_batch_buffers() -> WorkerBatchBuffers:
    """This worker process's buffers (each forked worker gets its own on first use)."""
    global _THIS_WORKER
    if _THIS_WORKER is None:
        _THIS_WORKER = WorkerBatchBuffers()
    return _THIS_WORKER
