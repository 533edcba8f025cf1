"""One SAE on several processes: torch.distributed data parallelism, as ``torchrun`` starts it.

    torchrun --nproc-per-node 2 -m worker train --activations acts.safetensors --out runs/a

torchrun starts one process per device and tells each its place through the environment
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); ``from_env`` reads them into a ``Dist`` and ``setup``
joins the process group: NCCL on CUDA (process ``LOCAL_RANK`` on ``cuda:LOCAL_RANK``), gloo on
the CPU. Without those variables ``Dist()`` is one process and every helper below is a no-op,
so the trainer calls them unconditionally.

How a run is shared (``Trainer`` and the activation sources do this with the helpers here):

* The global batch is ``batch_size``; each rank trains on ``batch_size / world_size`` rows of
  it (its shard of the stream: ``CachedActivations`` rows ``rank::world`` of the single
  process's batch, ``LiveActivations`` the contexts ``i % world == rank`` of each epoch).
* Every rank builds the same SAE from the same sample rows (the unsharded ``sample``), then
  rank 0's parameters, buffers and input scales are broadcast, so the ranks start identical.
* After backward the gradients are all-reduced (averaged): the same update as one process
  summing equal micro-batches, and what ``DistributedDataParallel`` does. Everything else that
  must stay identical is reduced too: the step's statistics (loss, L0, min kept activation for
  BatchTopK's running threshold, the L0 controller's input), the firing counts (dead latents,
  AuxK masks). So every rank holds the same SAE, optimizer and counters after every step.
* Rank 0 alone writes checkpoints (with every rank's data position gathered into it), metrics,
  exports and runs the held-out evaluation; the other ranks' callbacks are silent.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import Tensor

from .errors import ConfigError

TIMEOUT = timedelta(minutes=60)
"""How long a rank waits for the others at a collective: long enough for rank 0 to build a
token store or convert a model while the others wait (``main_first``)."""


@dataclass(frozen=True)
class Dist:
    """This process's place among the training processes (one process: the defaults)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    """The process's index on its machine (its GPU: ``cuda:local_rank``)."""
    local_world_size: int = 1
    """Processes on this machine."""

    @property
    def enabled(self) -> bool:
        """More than one process: the collectives below do something."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes checkpoints, metrics and exports, and prints."""
        return self.rank == 0

    # ------------------------------------------------------------------ collectives
    def all_reduce_sum(self, t: Tensor) -> Tensor:
        """``t`` summed over the ranks, in place (returned for chaining)."""
        if self.enabled:
            torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
        return t

    def all_reduce_mean(self, t: Tensor) -> Tensor:
        """``t`` averaged over the ranks, in place (a floating-point tensor)."""
        if self.enabled:
            torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
            t.div_(self.world_size)
        return t

    def broadcast(self, t: Tensor, src: int = 0) -> Tensor:
        """Rank ``src``'s ``t`` on every rank, in place."""
        if self.enabled:
            torch_dist.broadcast(t, src=src)
        return t

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s picklable ``obj`` (the others pass anything, e.g. None)."""
        if not self.enabled:
            return obj
        box = [obj]
        torch_dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, by rank."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch_dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    @contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (it may write caches: a converted model, a token
        store), the others after it, reading what it wrote."""
        if not self.is_main:
            self.barrier()
        try:
            yield
        finally:
            if self.is_main:
                self.barrier()

    def reduce_grads(self, params: Any) -> None:
        """Average the parameters' gradients over the ranks (one all-reduce each; a
        parameter without a gradient joins with zeros, so every rank calls the same
        collectives)."""
        if not self.enabled:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self.all_reduce_mean(p.grad)

    @torch.no_grad()
    def broadcast_module(self, module: torch.nn.Module, src: int = 0) -> None:
        """Rank ``src``'s parameters and buffers on every rank."""
        if not self.enabled:
            return
        for t in list(module.parameters()) + list(module.buffers()):
            self.broadcast(t.data, src)


SINGLE = Dist()
"""One process: no process group."""


def from_env(environ: dict[str, str] | None = None) -> Dist:
    """This process's place from torchrun's variables (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``); one process without them."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
        local_world = int(env.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE must be integers "
                          "(torchrun sets them).") from None
    if world < 1 or not 0 <= rank < world or not 0 <= local < local_world:
        raise ConfigError(f"Inconsistent torchrun environment: RANK {rank}, WORLD_SIZE {world}, "
                          f"LOCAL_RANK {local}, LOCAL_WORLD_SIZE {local_world}.")
    return Dist(rank, world, local, local_world)


def local_batch(batch_size: int, dist: Dist) -> int:
    """Vectors each rank trains on per step: its share of the global ``batch_size``;
    ConfigError when it does not divide evenly."""
    if batch_size % dist.world_size:
        raise ConfigError(f"The batch size ({batch_size:,}) must divide evenly among the "
                          f"{dist.world_size} training processes (each trains on batch size / "
                          "processes vectors per step).")
    return batch_size // dist.world_size


def device_for(dist: Dist, device: torch.device) -> torch.device:
    """The device of this rank for a run asking for ``device`` (``pick_device``'s answer):
    ``cuda:LOCAL_RANK`` on CUDA, the CPU as it is; ConfigError for what DDP cannot run on
    (MPS, fewer GPUs than processes on this machine)."""
    if not dist.enabled:
        return device
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise ConfigError(f"Training on several processes runs on CUDA (nccl) or the CPU "
                          f"(gloo), not on {device.type}; use --device cpu or cuda.")
    if device.index not in (None, 0):
        raise ConfigError(f"Under torchrun each process takes the GPU of its LOCAL_RANK; "
                          f"use --device cuda (or auto), not {device}.")
    gpus = torch.cuda.device_count()
    if gpus < dist.local_world_size:
        raise ConfigError(f"{dist.local_world_size} processes on this machine need as many GPUs "
                          f"(one each), but CUDA sees {gpus}; lower --nproc-per-node or use "
                          "--device cpu.")
    return torch.device("cuda", dist.local_rank)


def setup(dist: Dist, device: torch.device) -> Dist:
    """Join the process group of ``dist`` (nothing for one process): NCCL on CUDA, with this
    process's GPU made current, gloo on the CPU. Returns ``dist``."""
    if not dist.enabled or torch_dist.is_initialized():
        return dist
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                  rank=dist.rank, world_size=dist.world_size, timeout=TIMEOUT)
    return dist


def teardown() -> None:
    """Leave the process group (when one was joined)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
