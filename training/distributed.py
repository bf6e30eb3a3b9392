"""Process group, device and the few collectives the loop needs."""
from __future__ import annotations

import os

import torch


def launched_world_size() -> int:
    """World size before init: DeepSpeed's launcher/torchrun set WORLD_SIZE, mpirun its own variables."""
    for var in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if var in os.environ:
            return int(os.environ[var])
    return 1


def init_distributed() -> torch.device:
    """DeepSpeed's process group (gloo on the CPU accelerator) and this rank's device."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    backend = "gloo" if get_accelerator().device_name() == "cpu" else None
    deepspeed.init_distributed(dist_backend=backend)
    if backend == "gloo":
        release_shm_buffer()
    device = torch.device(get_accelerator().device_name(), int(os.environ.get("LOCAL_RANK", 0)))
    if device.type != "cpu":
        get_accelerator().set_device(device.index)
    return device


def release_shm_buffer() -> None:
    """DeepSpeed's CPU all-reduce maps one /dev/shm segment per rank and never unlinks it: every run
    would leave its segments (tens of MB each) in RAM-backed /dev/shm for good. Once every rank has
    mapped its peers' segments (the barrier), the names can go; the mappings live until exit."""
    import torch.distributed as dist

    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    dist.barrier()
    if os.path.exists(name):
        os.unlink(name)


def summer(device, group=None):
    """Sum a [1] tensor over the ranks of `group` (default: all ranks): the global token count."""
    import torch.distributed as dist

    def summed(t: torch.Tensor) -> torch.Tensor:
        t = t.to(device)
        dist.all_reduce(t, group=group)
        return t.cpu()
    return summed


def mean_over_ranks(value: torch.Tensor) -> float:
    import torch.distributed as dist

    value = value.clone()
    dist.all_reduce(value)
    return float(value) / dist.get_world_size()
