"""Where the work runs, set up once for both phases: the device, torch.distributed, mixed precision.

``compute_init`` reads the launcher's environment (torchrun / deepspeed set RANK, WORLD_SIZE,
LOCAL_RANK), picks this rank's device and joins the process group; ``compute_cleanup`` leaves it.
Both phases call them in try/finally, so a failing rank never leaves a group behind.
"""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Compute:
    """This process's place in the job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # compute_init started the process group, so compute_cleanup ends it

    def barrier(self) -> None:
        barrier(self.world)


def barrier(world: int) -> None:
    """Wait for every rank (a no-op in a one-process run, a DeepSpeed group of one included)."""
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.barrier()


def pick_device(setting: str, local_rank: int, key: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N``; ``auto`` and ``cuda`` mean this rank's GPU (``cuda:LOCAL_RANK``)."""
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda":
        setting = f"cuda:{local_rank}"
    device = torch.device(setting)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"{key}={setting!r} but CUDA is not available; set {key}=cpu or auto")
        torch.cuda.set_device(device)
    return device


def compute_init(device_setting: str, key: str, timeout: timedelta, group_of_one: bool = False) -> Compute:
    """Rank, world size and device from the launcher's environment; joins the process group when there
    are several ranks, or when ``group_of_one`` asks for one without a launcher (DeepSpeed needs a group).

    ``key`` names the config key of ``device_setting`` in errors. ``timeout`` bounds every collective:
    ranks wait at barriers for the slowest one, so it must cover the longest one-rank stretch of work.
    """
    env = os.environ
    rank, world, local_rank = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
    device = pick_device(device_setting, local_rank, key)
    owns_group = (world > 1 or group_of_one) and not dist.is_initialized()
    if owns_group:
        if "RANK" not in env:  # no launcher: a group of this one process
            env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=env.get("MASTER_PORT", str(free_port())))
        backend = "nccl" if device.type == "cuda" else "gloo"
        # device_id binds the NCCL communicator to this rank's GPU at once (no guessing at the first collective)
        kwargs = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timeout, **kwargs)
        bound_later_groups(timeout)
    return Compute(rank, world, local_rank, device, owns_group)


def bound_later_groups(timeout: timedelta) -> None:
    """Give the process groups created later the same bound: DeepSpeed reduces gradients in groups of its own
    (``dist.new_group`` without a timeout), which torch bounds by its defaults (30 min for gloo, 10 for NCCL)
    instead of the timeout this job was started with."""
    import torch.distributed.distributed_c10d as c10d

    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout


def compute_cleanup(compute: Compute) -> None:
    """Leave the process group ``compute_init`` started, if it did (safe on any exit path)."""
    if compute.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def autocast(device: torch.device, bf16: bool) -> torch.autocast:
    """bf16 autocast on CUDA when ``bf16`` is asked for; fp32 everywhere else (CPU runs stay exact)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")


def use_tf32(enabled: bool) -> None:
    """With ``enabled``, CUDA's fp32 matrix products run in TF32 (tensor cores, 10-bit mantissa), as Hugging Face
    ``TrainingArguments(tf32=True)`` sets them (the reference's run.sh passes ``--tf32 True``); False leaves
    PyTorch's setting (IEEE fp32 matrix products). Convolutions keep PyTorch's default (TF32 in cuDNN)."""
    if not enabled:
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9
        matmul.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True


def tf32_matmuls() -> bool:
    """Whether CUDA's fp32 matrix products run in TF32 in this process (:func:`use_tf32`, or set elsewhere)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # "none": the global setting (transformers' enable_tf32 sets that one)
        own = matmul.fp32_precision
        return own == "tf32" or (own == "none" and getattr(torch.backends, "fp32_precision", "none") == "tf32")
    return bool(matmul.allow_tf32)
