"""The processes of a run: which one am I, how many are we, and the few collectives unclip needs.

A plain `python` or `unclip` command is rank 0 of a world of 1, and every helper here is then a
local no-op. Under `accelerate launch` (or torchrun) `start()` lets accelerate initialise
torch.distributed: NCCL between GPUs, gloo between CPU processes. The trainer creates its
`Accelerator` itself; `unclip embed` and other non-training work call `start()`.

Every collective here must be reached by every rank. That is why failures are exchanged
(`all_ok`, `gather`) rather than raised on one rank alone: a rank that raises while the others
wait in a collective would leave them hanging until the backend's timeout.
"""

from __future__ import annotations

import os
from typing import Any

import torch


def launched_world_size() -> int:
    """How many processes the launcher started (WORLD_SIZE; 1 when not launched)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def cpu_only() -> bool:
    """True where torch sees no GPU: processes then talk over gloo (accelerate's MULTI_CPU)."""
    return not torch.cuda.is_available()


def start():
    """Join the launched processes (a no-op for one process); returns accelerate's PartialState."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_only())


def finish() -> None:
    """Leave the process group at the end of a launched run. A process that exits with it still open
    can abort in torch's C++ runtime ("terminate called without an active exception") after its
    work is done, and the launcher then reports the whole run failed (2 in 10 gloo runs here)."""
    if _initialized():
        torch.distributed.barrier()  # no rank leaves while another still talks to it
        torch.distributed.destroy_process_group()


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless torch.distributed is initialised."""
    if _initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _device() -> torch.device:
    """The device collectives run on: NCCL needs CUDA tensors, gloo takes CPU tensors."""
    if _initialized() and torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_ok(ok: bool) -> bool:
    """True when `ok` is true on every rank (one small all-reduce when there are several)."""
    if rank_world()[1] == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], device=_device())
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
    return bool(flag.item())


def gather(obj: Any) -> list[Any]:
    """`obj` from every rank, in rank order, on every rank (picklable objects)."""
    world = rank_world()[1]
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def mean(values: list[float]) -> list[float]:
    """The element-wise mean of `values` over ranks (every rank passes the same length)."""
    world = rank_world()[1]
    if world == 1 or not values:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_device())
    torch.distributed.all_reduce(tensor)
    return (tensor / world).tolist()


def from_main(value: int) -> int:
    """The main process's `value` on every rank, so that decisions taken on one clock agree."""
    if rank_world()[1] == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_device())
    torch.distributed.broadcast(tensor, src=0)
    return int(tensor.item())


def agree(*, main: bool, anyone: bool) -> tuple[bool, bool]:
    """(the main process's `main`, whether `anyone` is true on any rank), the same on every rank, in
    one all-reduce: a decision taken on the main process's clock, and one any rank can call for (a
    SIGTERM that reached only some ranks, as when one node of several is preempted)."""
    rank, world = rank_world()
    if world == 1:
        return main, anyone
    tensor = torch.tensor([int(main and rank == 0), int(anyone)], dtype=torch.int64, device=_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
    return bool(tensor[0].item()), bool(tensor[1].item())


def barrier() -> None:
    if rank_world()[1] > 1:
        torch.distributed.barrier()
