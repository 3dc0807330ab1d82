"""Training and validation steps, free of any orchestration (no Ray, no MLflow).

The pipeline's Ray Train worker calls these; so can a notebook or a plain script.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import islice

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler, PolynomialLR

from nnmamba.inference import predict_labels
from nnmamba.metrics import dice

AMP_DTYPES: dict[str, torch.dtype | None] = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def amp_dtype(name: str) -> torch.dtype | None:
    """Map the params.yaml `amp` string to a dtype (None = full precision)."""
    if name not in AMP_DTYPES:
        raise ValueError(f"unknown amp mode {name!r}; known: {sorted(AMP_DTYPES)}")
    return AMP_DTYPES[name]


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """Mixed precision where asked for; a no-op context otherwise."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
SCHEDULES = ("constant", "poly")
POLY_EXPONENT = 0.9     # nnU-Net's PolyLRScheduler: lr * (1 - epoch / epochs) ** 0.9


def build_optimizer(
    model: nn.Module, name: str, lr: float, weight_decay: float, momentum: float = 0.0, nesterov: bool = False,
    capturable: bool = False, tensor_lr: bool = False,
) -> torch.optim.Optimizer:
    """Adam (the paper's: lr 0.002, weight decay 0.001), AdamW (MONAI's transformer recipes) or SGD
    (nnU-Net's: lr 0.01, Nesterov momentum 0.99, weight decay 3e-5); SSM parameters flagged
    `_no_weight_decay` are exempt.

    `capturable=True` keeps the optimizer's step counters on the GPU so that its step can be
    recorded in a CUDA graph (`CapturedTrainStep`); `tensor_lr=True` holds the learning rate in a
    device tensor, so a schedule can change it under a recorded graph (a float would be baked in).
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {sorted(OPTIMIZERS)}")
    if name != "sgd" and (momentum or nesterov):
        raise ValueError(f"momentum and nesterov are SGD settings; optimizer {name!r} takes neither")
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if getattr(param, "_no_weight_decay", False) else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # On the GPU the fused kernel updates every parameter in a few launches instead of a dozen
    # multi-tensor passes; same arithmetic. None keeps PyTorch's default elsewhere.
    params = decay + no_decay
    fused = True if params and all(p.is_cuda for p in params) else None
    rate = torch.tensor(lr, device=params[0].device) if tensor_lr and params else lr
    # SGD keeps no step counter, so it has nothing to make capturable; Adam(W) has no momentum setting.
    own = {"momentum": momentum, "nesterov": nesterov} if name == "sgd" else {"capturable": capturable}
    return OPTIMIZERS[name](groups, lr=rate, fused=fused, **own)


def build_schedule(optimizer: torch.optim.Optimizer, schedule: str, epochs: int) -> LRScheduler | None:
    """The learning-rate schedule, stepped once per epoch: None for a constant rate; `poly` decays it
    as nnU-Net does (torch's PolynomialLR computes the same curve)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; known: {list(SCHEDULES)}")
    if schedule == "constant":
        return None
    return PolynomialLR(optimizer, total_iters=epochs, power=POLY_EXPONENT)


def repeat_batches(loader: Iterable) -> Iterator:
    """Cycle a finite loader forever, so an epoch is a fixed number of steps (nnU-Net style)."""
    while True:
        yield from loader


class WaitTimedBatches(Iterator):
    """Batches from `batches`, adding up the seconds the consumer waited for them: the loader's share
    of an epoch, which the GPU spends idle once the queued step is done. `first_at` is the wall-clock
    time the first batch arrived, when the first step could start."""

    def __init__(self, batches: Iterator):
        self.batches, self.waited_s = batches, 0.0
        self.first_at: float | None = None

    def __next__(self):
        started = time.perf_counter()
        try:
            batch = next(self.batches)
        finally:
            self.waited_s += time.perf_counter() - started
        if self.first_at is None:
            self.first_at = time.time()
        return batch

    def take_waited_s(self) -> float:
        """Seconds waited since the last call."""
        waited, self.waited_s = self.waited_s, 0.0
        return waited


@contextlib.contextmanager
def capture_ready_stream(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Run the block (build the DistributedDataParallel wrapper) on a side CUDA stream, joined back after.

    DDP keeps every parameter's gradient accumulator (an autograd node) for its whole life, and
    each remembers the stream it was created on. Built on the default (legacy) stream, the
    backward of a captured step then makes that stream wait on the capturing one, which CUDA
    refuses ("operation would make the legacy stream depend on a capturing blocking stream");
    PyTorch's CUDA Graphs notes build DDP on a side stream for this reason. A no-op off the GPU.
    """
    if not enabled or device.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        yield
    torch.cuda.current_stream(device).wait_stream(stream)


def optimisation_step(model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer, image: torch.Tensor,
                      target: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Forward, loss, backward and optimizer step on one batch; returns the loss, detached and not synchronised."""
    optimizer.zero_grad(set_to_none=True)
    with autocast(image.device, dtype):
        loss = loss_fn(model(image), target)
    loss.backward()
    optimizer.step()
    return loss.detach()


# How training wraps its model in DistributedDataParallel (the Ray worker and the DDP benchmark
# alike). The step's graph never changes (static_graph: DDP records once which parameters get
# gradients, and the shared MIC branches used twice per step need no extra bookkeeping), and
# gradients live in the all-reduce buckets (gradient_as_bucket_view: no copy into and out of
# them, and no second set of gradient-sized buffers).
DDP_OPTIONS = {"static_graph": True, "gradient_as_bucket_view": True}

# Eager steps before capture: PyTorch's CUDA-graph notes ask for 11 under DDP (its buckets are built by then).
CAPTURE_WARMUP_STEPS = 11


class CapturedTrainStep:
    """One training step (forward, loss, backward, optimizer step) recorded once as a CUDA graph, then replayed.

    The nnMamba step launches a few thousand kernels, many of them small; launched one by one
    from Python the CPU took longer than the GPU ran them (H200, segmentation miccss: 73 ms per
    step for 46 ms of kernels). A replayed graph launches them all at once. Needs fixed input
    shapes (patch and batch size) and an optimizer built with `capturable=True`.

    `model` may be wrapped in DistributedDataParallel (NCCL, `static_graph=True`, the wrapper built
    inside `capture_ready_stream`): the graph then holds the gradient all-reduces too, which every
    rank replays in the same order. The first
    `warmup` calls run eagerly on a side stream, as CUDA graph capture requires: cuDNN picks its
    algorithms, lazy state is created and DDP builds its buckets and, with a static graph,
    settles its bucket order after the first iterations; PyTorch's CUDA Graphs notes ask for 11
    warm-up iterations under DDP, so that is the default. Every call trains on its batch.
    """

    def __init__(self, model: nn.Module, loss_fn: nn.Module, optimizer: torch.optim.Optimizer,
                 dtype: torch.dtype | None, warmup: int = CAPTURE_WARMUP_STEPS):
        self.model, self.loss_fn, self.optimizer, self.dtype = model, loss_fn, optimizer, dtype
        self.warmup_left = warmup
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: dict[str, torch.Tensor] = {}
        self.side_stream = torch.cuda.Stream()

    def _step(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return optimisation_step(self.model, self.loss_fn, self.optimizer, image, target, self.dtype)

    def __call__(self, image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Train on one batch; returns the loss (on the GPU)."""
        if self.warmup_left > 0:
            self.warmup_left -= 1
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                loss = self._step(image, target)
            torch.cuda.current_stream().wait_stream(self.side_stream)
            return loss
        if self.graph is None:
            self.static = {"image": image.clone(), "target": target.clone()}
            self.graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)
            # thread_local: the loader's pin-memory thread keeps allocating and querying pinned host
            # blocks (CUDA calls a global-mode capture forbids in any thread), which invalidated the
            # mic trial's capture once the loader fetched without pause (H100, 6e186aa).
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                self.static["loss"] = self._step(self.static["image"], self.static["target"])
        else:
            self.static["image"].copy_(image)
            self.static["target"].copy_(target)
        self.graph.replay()
        return self.static["loss"].clone()


def train_epoch(
    model: nn.Module,
    batches: Iterator[Mapping[str, torch.Tensor]],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    steps: int,
    device: torch.device,
    dtype: torch.dtype | None = None,
    channels_last: bool = False,
    captured_step: CapturedTrainStep | None = None,
) -> float:
    """Run `steps` optimisation steps and return the mean training loss.

    Each step's loss is read (a GPU synchronisation) only after the next step has been launched,
    so the GPU keeps working while the next batch is fetched and copied (`device_batches`). A non-finite loss
    therefore stops training with an error one step after it occurred: the weights in memory
    are spoilt by then, but nothing is saved from them.
    """
    model.train()
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    values: list[float] = []
    previous: tuple[torch.Tensor, int] | None = None
    for step, (image, target) in enumerate(device_batches(islice(batches, steps), device, memory_format)):
        if captured_step is not None:
            loss = captured_step(image, target)
        else:
            loss = optimisation_step(model, loss_fn, optimizer, image, target, dtype)
        if previous is not None:
            values.append(_finite_loss(*previous))
        previous = loss, step
    if previous is None:
        raise ValueError("train_epoch got no batches")
    values.append(_finite_loss(*previous))
    return sum(values) / len(values)


def device_batches(batches: Iterable[Mapping[str, torch.Tensor]], device: torch.device,
                   memory_format: torch.memory_format) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(image, label) of each batch on `device`; on a GPU each copy overlaps the step before it.

    A BraTS batch (2 x 4 x 128^3) is 38 MB as the patch loader hands it over (bf16 image, uint8
    label), 101 MB with a float32 image and int64 label. Copied on the compute stream, every step
    would first wait for it. Here batch k+1 is copied on a side stream, issued before step k is handed
    out, and the compute stream waits only for that copy's event when it reaches step k+1. The
    copy is asynchronous when the loader pins its batches (`pin_memory`).
    """
    if device.type != "cuda":
        yield from (_on_device(batch, device, memory_format) for batch in batches)
        return
    copy_stream = torch.cuda.Stream(device)
    pending: tuple[tuple[torch.Tensor, torch.Tensor], torch.cuda.Event] | None = None
    for batch in batches:
        with torch.cuda.stream(copy_stream):
            copied = _on_device(batch, device, memory_format)
            done = torch.cuda.Event()
            done.record(copy_stream)
        if pending is not None:
            yield _ready(*pending, device)
        pending = copied, done
    if pending is not None:
        yield _ready(*pending, device)


def _on_device(batch: Mapping[str, torch.Tensor], device: torch.device,
               memory_format: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer labels travel compact (uint8 segmentation maps) and are widened to the int64 losses take here."""
    image = batch["image"].to(device, non_blocking=True).contiguous(memory_format=memory_format)
    label = batch["label"].to(device, non_blocking=True)
    return image, label if label.is_floating_point() else label.long()


def _ready(tensors: tuple[torch.Tensor, torch.Tensor], done: torch.cuda.Event,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The copied tensors, usable on the compute stream once their copy's event has passed."""
    compute = torch.cuda.current_stream(device)
    compute.wait_event(done)
    for tensor in tensors:
        tensor.record_stream(compute)  # their memory was allocated on the copy stream
    return tensors


def _finite_loss(loss: torch.Tensor, step: int) -> float:
    value = loss.item()
    if not math.isfinite(value):
        raise FloatingPointError(f"training loss became {value} at step {step}")
    return value


def validation_dice(
    model: nn.Module,
    cases: Iterable[tuple[torch.Tensor, torch.Tensor]],
    regions: Mapping[str, Sequence[int]],
    patch_size: Sequence[int],
    overlap: float,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> list[float]:
    """Per-case mean Dice over `regions` with whole-volume sliding-window inference."""
    scores = []
    for image, label in cases:
        pred = predict_labels(model, image, patch_size, overlap=overlap, device=device, amp_dtype=dtype)[0].numpy()
        truth = label.reshape(pred.shape).numpy()
        per_region = [dice(np.isin(pred, labels), np.isin(truth, labels)) for labels in regions.values()]
        scores.append(sum(per_region) / len(per_region))
    return scores
