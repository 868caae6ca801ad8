"""Data-parallel training over the processes torchrun starts, with the semantics of Caffe's multi-GPU training.

    torchrun --nproc-per-node=2 scripts/train.py --net gender --no-pretrain
    torchrun --nnodes=2 --node-rank=0 --master-addr=HOST --master-port=29500 --nproc-per-node=4 scripts/train.py ...

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK in every worker; a process without them (or with WORLD_SIZE=1) is
a one-process run, and everything here is then a no-op. What Caffe does (parallel.cpp, solver.cpp, data_reader.cpp)
and the torch backend therefore does too:

- each worker reads its own batch of batch_size records: worker r of N takes the r-th batch of each group of N
  consecutive batches in LMDB order (caffekit/lmdb_data.py), every Data layer of the net alike, so a second LMDB
  of labels stays aligned with the images on every worker;
- the gradients are averaged over the workers (Caffe's NCCL allreduce scaled by 1/N; DDP's mean), so one step is
  one step on a batch of N x batch_size;
- the root solver (rank 0) alone tests, snapshots, logs and prints; the others wait for it at a barrier;
- BatchNorm's running statistics are each worker's own, as each Caffe solver's are, and the snapshot holds rank
  0's. They are parameters without gradients (caffekit/torchnet.py), never buffers, so DDP broadcasts them once
  at the start (all zero then) and never again; training uses the batch's statistics, so they change no step.
"""
import atexit
import contextlib
import functools
import os
import sys
from typing import NamedTuple, Tuple

from caffekit.errors import EXIT_INTERRUPTED, KitError


class Workers(NamedTuple):
    rank: int        # 0 .. size-1 over every machine
    local_rank: int  # on this machine: which GPU
    size: int

    @property
    def main(self) -> bool:
        """Whether this worker writes, logs and prints (Caffe's root solver)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def from_environment(environ=os.environ) -> Workers:
    """The workers as torchrun describes them in ``environ``."""
    names = ("RANK", "LOCAL_RANK", "WORLD_SIZE")
    try:
        rank, local_rank, size = (int(environ.get(name, default)) for name, default in zip(names, "001"))
    except ValueError:
        found = ", ".join(f"{name}={environ.get(name)!r}" for name in names)
        raise KitError(f"{found}: expected whole numbers, as torchrun sets them") from None
    if size < 1 or not 0 <= rank < size or local_rank < 0:
        raise KitError(f"RANK={rank}, LOCAL_RANK={local_rank}, WORLD_SIZE={size}: expected 0 <= RANK < WORLD_SIZE")
    return Workers(rank, local_rank, size)


@functools.lru_cache(maxsize=None)
def workers() -> Workers:
    return from_environment()


def device(chosen):
    """The device of this worker: on CUDA, GPU LOCAL_RANK of this machine (NCCL needs one GPU per worker)."""
    import torch

    w = workers()
    if chosen.type != "cuda" or not w.distributed:
        return chosen
    count = torch.cuda.device_count()
    if w.local_rank >= count:
        raise KitError(f"LOCAL_RANK={w.local_rank}: this machine has {count} CUDA devices (one per worker: "
                       f"--nproc-per-node={count} at most, or --device cpu)")
    torch.cuda.set_device(w.local_rank)
    return torch.device("cuda", w.local_rank)


def start(on) -> str:
    """Join the process group once per process (gloo on the CPU, NCCL on CUDA GPUs); its backend name,
    or "" in a one-process run."""
    import torch.distributed as dist

    if not workers().distributed:
        return ""
    if not dist.is_available():
        raise KitError(f"WORLD_SIZE={workers().size}: this torch build has no torch.distributed")
    if not dist.is_initialized():
        # env:// reads MASTER_ADDR and MASTER_PORT, which torchrun sets.
        dist.init_process_group("nccl" if on.type == "cuda" else "gloo")
        atexit.register(stop)
    return dist.get_backend()


def stop() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _active() -> bool:
    import torch.distributed as dist

    return workers().distributed and dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait until every worker is here (no-op in a one-process run)."""
    import torch
    import torch.distributed as dist

    if not _active():
        return
    if dist.get_backend() == "nccl":  # NCCL's barrier is an allreduce on a GPU: this worker's
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def from_main(value: int, on) -> int:
    """Rank 0's ``value`` on every worker (a seed drawn at random must be one seed)."""
    import torch
    import torch.distributed as dist

    if not _active():
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=on)
    dist.broadcast(tensor, src=0)
    return int(tensor.item())


def mean_and_any(value: float, flag: bool, on) -> Tuple[float, bool]:
    """(the mean of ``value`` over the workers, whether any worker's ``flag`` is set), in one allreduce: the
    loss of the whole N x batch_size batch, and a Ctrl-C seen by any worker, which all must obey together."""
    import torch
    import torch.distributed as dist

    if not _active():
        return value, flag
    tensor = torch.tensor([value, float(flag)], dtype=torch.float64, device=on)
    dist.all_reduce(tensor)
    return float(tensor[0]) / workers().size, bool(tensor[1] > 0)


def wrap(module, on):
    """``module`` under DistributedDataParallel (the module itself in a one-process run)."""
    if not _active():
        return module
    from torch.nn.parallel import DistributedDataParallel

    # Buffers are left at DDP's default: the net has none (see the module docstring on BatchNorm), and DDP
    # syncs buffers only where there are some, so each worker's BatchNorm statistics stay its own.
    return DistributedDataParallel(module, device_ids=[on.index] if on.type == "cuda" else None)


@contextlib.contextmanager
def quiet_unless_main():
    """Run the body with stdout and stderr sent nowhere on every worker but rank 0, which speaks for all.
    A KitError still reaches the worker's stderr, naming the worker: it may be that machine's alone."""
    w = workers()
    if w.main:
        yield
        return
    saved = sys.stdout, sys.stderr
    with open(os.devnull, "w") as sink:
        sys.stdout = sys.stderr = sink
        try:
            yield
        except KitError as exc:
            raise KitError(f"worker {w.rank} of {w.size}: {exc}") from None
        except KeyboardInterrupt:  # rank 0 says "interrupted" for all
            sys.exit(EXIT_INTERRUPTED)
        finally:
            sys.stdout, sys.stderr = saved
