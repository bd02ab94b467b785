"""Where the work runs, set up once for both phases: mixed precision (and, later, torch.distributed)."""
from __future__ import annotations

import torch


def autocast(device: torch.device, bf16: bool) -> torch.autocast:
    """bf16 autocast on CUDA when ``bf16`` is asked for; fp32 everywhere else (CPU runs stay exact)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16 and device.type == "cuda")
