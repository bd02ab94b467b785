"""What the SAM anchor's Triton kernels (sam_masks.py, sam_attention.py) share: where they run, and the precision of
their fp32 products."""
from __future__ import annotations

import os

import torch

from covt.compute import tf32_matmuls


def runs_on(device: torch.device) -> bool:
    """Whether the kernels run for tensors on ``device``: CUDA, or anywhere under the interpreter."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def kernel_precision(dtype: torch.dtype, on_gpu: bool) -> str:
    """The kernel's ``tl.dot`` precision for tokens of ``dtype``. It applies to fp32 operands only (bf16 ones multiply
    in bf16 either way): TF32 where the process's fp32 products run in TF32 (``precompute.tf32``). Without TF32 a GPU
    runs three TF32 products per product ("tf32x3", near fp32): Triton's plain fp32 ("ieee") products unroll to FMAs
    that ptxas took over ten minutes to compile at 64 tokens per program; the interpreter runs "ieee"."""
    if dtype != torch.float32 or (on_gpu and tf32_matmuls()):
        return "tf32"
    return "tf32x3" if on_gpu else "ieee"
