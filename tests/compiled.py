"""What the tests of compiled code share: a small block with LoRA on three Linears, and dynamo's recompilations
logged while a block of code runs."""
from __future__ import annotations

import contextlib
import logging

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import get_peft_model
from torch._logging import set_logs


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.up, self.down = torch.nn.Linear(32, 32), torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.down(torch.nn.functional.silu(self.up(x + self.q(x))))


def lora_block(dropout: float) -> torch.nn.Module:
    """:class:`Block` with random rank-4 adapters (B not zero) on its three Linears."""
    return get_peft_model(Block(), PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, init_lora_weights=False,
                                                  target_modules=["q", "up", "down"]))


@contextlib.contextmanager
def recompilations():
    """Yields a list that collects dynamo's recompilation messages (each with its guard failures) while active."""
    messages: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logger = logging.getLogger("torch._dynamo.guards.__recompiles")
    logger.addHandler(handler)
    set_logs(recompiles=True)
    try:
        yield messages
    finally:
        set_logs()
        logger.removeHandler(handler)
