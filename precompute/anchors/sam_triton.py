"""What SAM's Triton kernels (``sam_masks.py``, ``sam_keys.py``) share: where they run and their products' precision."""
from __future__ import annotations

import os

import torch


def runs_on(device: torch.device) -> bool:
    """Whether the kernels run for tensors on ``device``: CUDA, or anywhere under Triton's interpreter
    (``TRITON_INTERPRET=1`` set before triton is imported; slow, for tests)."""
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def product_precision(operands: torch.Tensor) -> str:
    """``tl.dot``'s ``input_precision`` for operands like ``operands``, as the library's products would run them.

    bf16 operands multiply in bf16 whatever this says. fp32 ones take TF32 where
    ``torch.backends.cuda.matmul.allow_tf32`` is on (the library's products under ``precompute.tf32``), three TF32
    products each otherwise ("tf32x3", near fp32): Triton's plain fp32 ("ieee") products unroll to FMAs that ptxas
    took over ten minutes to compile at 64 tokens per program. The interpreter multiplies in fp32 ("ieee")."""
    if not operands.is_cuda:
        return "ieee"
    if operands.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "tf32x3"
    return "tf32"
