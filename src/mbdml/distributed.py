"""Data-parallel training on several processes with torch.distributed (launched by torchrun).

``torchrun --nproc_per_node N -m mbdml train ...`` (or ``mbdml train --nproc N``) starts N
processes; each runs the same :class:`mbdml.engine.Trainer`, which finds the launcher's
environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and joins the process group
here: gloo on CPUs, nccl on CUDA GPUs. What is shared and how:

- Gradients of the network, the mixup head and the kernel weights: averaged by
  ``DistributedDataParallel`` at every step, so every rank keeps the same parameters.
- Batches: every rank draws the same global batch of N x ``batch_size`` images (same
  seeded order and augmentation) and trains on its own slice of it, so one step equals
  a single process on the concatenated batch (up to BatchNorm, whose batch statistics
  are per rank unless ``--sync_bn`` on GPUs).
- Centres: at a refresh each rank embeds its shard of the labelled images and searches
  the neighbours of its shard; one all-gather gives every rank the same full centres,
  labels and training neighbour lists.
- Evaluation: each rank embeds its shard of the validation and test images; they are
  gathered once and rank 0 computes the metrics, which it shares with the others.
- Mixup stays inside a rank: the pairing permutation and lambda are drawn per rank
  within its own slice of the batch, as data-parallel Mixup does elsewhere.
- Files: only rank 0 writes (configuration, checkpoints, metrics, plots, logs).

A lost process (killed, out of memory, a node gone) makes the next collective fail on
the others (or time out after ``--dist_timeout`` seconds); they stop with a
:class:`~mbdml.errors.TrainingError` that says so, and torchrun ends the rest.
"""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import ConfigError, TrainingError


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this module created the process group (and will destroy it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> slice:
        """This rank's contiguous part of ``range(n)`` (sizes differ by at most one)."""
        return shard_slice(n, self.rank, self.world_size)


SINGLE = DistContext()


def shard_slice(n: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous slice when ``n`` items are split over ``world_size`` ranks."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


def launched_by_torchrun() -> bool:
    """True when the environment describes a job of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_type: str, timeout_s: float = 600.0) -> DistContext:
    """Join the job torchrun described, or return the single-process context.

    Uses nccl for CUDA devices and gloo otherwise. An already initialised default
    process group (a user's own launcher) is used as it is.
    """
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), owns_group=False)
    if not launched_by_torchrun():
        return SINGLE
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; train with one process (drop torchrun / --nproc)")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise ConfigError(f"WORLD_SIZE is set but {', '.join(missing)} is not: launch with torchrun --nproc_per_node N -m mbdml train ...")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        if local_rank >= torch.cuda.device_count():
            raise ConfigError(f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; start at most that many processes per node")
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    except Exception as exc:  # rendezvous failures: address, port, firewall
        raise TrainingError(
            f"could not join the distributed job ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"check MASTER_ADDR/MASTER_PORT (torchrun --rdzv_endpoint) and that every node can reach it"
        ) from None
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, owns_group=True)


def shutdown(ctx: DistContext, clean: bool = True) -> None:
    """Leave the process group if :func:`init_distributed` created it.

    On a clean exit every process first waits for the others (a barrier): one that
    tears its connections down while a peer is still using them can make the peer's
    communication threads abort it (exit status -6). After a failure (``clean`` False)
    there is no barrier: a lost peer would never arrive at it.

    Unreachable DistributedDataParallel wrappers are collected first: one freed only at
    interpreter exit, after the group is gone, can abort the process there ("terminate
    called without an active exception") although the run finished."""
    if ctx.owns_group and dist.is_initialized():
        gc.collect()
        if clean and ctx.world_size > 1:
            try:
                dist.barrier()
            except Exception:  # a peer already gone: leave without waiting
                pass
        dist.destroy_process_group()


def lost_peer_error(exc: BaseException, ctx: DistContext, run_dir: Any) -> TrainingError:
    """The message a rank gives when a collective fails because another process is gone."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return TrainingError(
        f"rank {ctx.rank} of {ctx.world_size} lost contact with the other training processes ({first[:200]}): "
        f"another rank died (see its own error above) or the network failed. The last finished epoch is saved "
        f"in {run_dir}; start the same torchrun command with --resume {run_dir} to continue"
    )


def is_collective_failure(exc: BaseException) -> bool:
    """Whether an exception comes from a failed or timed-out collective."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(s in text for s in ("gloo", "nccl", "connection closed", "connection reset", "timed out", "broken pipe"))


# --------------------------------------------------------------- collectives
def all_gather_rows(local: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate every rank's rows in rank order (shards may differ in length by one)."""
    if not ctx.enabled:
        return local
    sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(ctx.world_size)]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], dtype=torch.long, device=local.device))
    longest = int(max(int(s) for s in sizes))
    padded = local.new_zeros((longest,) + tuple(local.shape[1:]))
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes)])


def average_(tensors: list[torch.Tensor], ctx: DistContext) -> None:
    """Replace each tensor, in place, by its mean over the ranks."""
    if not ctx.enabled:
        return
    for t in tensors:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(ctx.world_size)


def average_batchnorm_stats_(model: torch.nn.Module, ctx: DistContext) -> None:
    """Average BatchNorm running means and variances over the ranks (each estimated them on its shard)."""
    if not ctx.enabled:
        return
    stats = []
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.running_mean is not None:
            stats += [m.running_mean, m.running_var]
    average_(stats, ctx)


def sum_scalars(values: dict[str, float], ctx: DistContext) -> dict[str, float]:
    """Sum a dict of numbers over the ranks (same keys on every rank)."""
    if not ctx.enabled or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return {k: float(v) for k, v in zip(keys, t.tolist())}


def broadcast_object(obj: Any, ctx: DistContext, src: int = 0) -> Any:
    """Rank ``src``'s Python object, on every rank."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's Python object, in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


class StepModule(torch.nn.Module):
    """The network and the method as one module, so DistributedDataParallel sees one
    forward per step and averages the gradients of all their parameters (the model,
    the mixup head, the kernel weights, a baseline's proxies)."""

    def __init__(self, model: torch.nn.Module, method: torch.nn.Module, train_model: Any = None) -> None:
        super().__init__()
        self.model = model
        self.method = method
        self._train_model = train_model  # a torch.compile'd view of model, sharing its parameters

    def forward(self, images: torch.Tensor, labels: torch.Tensor, indices: torch.Tensor, generator: torch.Generator | None = None, **extra: Any) -> Any:
        return self.method(self._train_model or self.model, images, labels, indices, generator, **extra)


def wrap_step(model: torch.nn.Module, method: torch.nn.Module, train_model: Any, device: torch.device, ctx: DistContext) -> Any:
    """A callable ``step(images, labels, indices, generator) -> LossOutput``, data-parallel when ``ctx`` is."""
    if not ctx.enabled:
        return lambda images, labels, indices, generator=None, **extra: method(train_model, images, labels, indices, generator, **extra)
    from torch.nn.parallel import DistributedDataParallel

    step = StepModule(model, method, train_model if train_model is not model else None)
    return DistributedDataParallel(
        step,
        device_ids=[device.index] if device.type == "cuda" else None,
        # Buffers are not sent at each step: the centres are all-gathered at each refresh
        # and BatchNorm statistics averaged there.
        forward_sync_buffers=False,
    )
