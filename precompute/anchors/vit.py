"""DINOv2 vision transformer in the original (torch.hub) checkpoint layout.

Shared by the ``dino`` anchor (plain DINOv2) and the ``depth`` anchor (the
Depth Anything V2 encoder, stored under ``pretrained.*``). Module and parameter
names follow the released files (``cls_token``, ``pos_embed``, ``mask_token``,
``patch_embed.proj``, ``blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,
mlp.fc1,mlp.fc2 | mlp.w12,mlp.w3,ls2.gamma}``, ``norm``) so they load strictly.

``VARIANTS`` is the one place for every size that depends on the variant: the
transformer shape, the layers and widths the DPT depth head reads, and the
input/map sizes each anchor computes at.
"""
from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

PATCH_SIZE = 14
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ViTVariant:
    name: str
    embed_dim: int
    depth: int
    num_heads: int
    ffn: str  # "mlp" (GELU) or "swiglu" (ViT-g)
    pretrain_size: int  # the position embedding grid is pretrain_size / 14 square
    depth_layers: tuple[int, int, int, int]  # blocks whose normed tokens the DPT head reads
    dpt_features: int
    dpt_out_channels: tuple[int, int, int, int]
    depth_input_size: int  # square view Depth Anything V2 computes from
    depth_map_size: int  # side of the cached relative depth map
    dino_input_size: int  # square view DINOv2 computes from

    @property
    def mlp_hidden(self) -> int:
        hidden = 4 * self.embed_dim
        if self.ffn == "swiglu":  # DINOv2's fused SwiGLU: 2/3 of 4x, rounded up to a multiple of 8
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden


def _real(name, dim, depth, heads, ffn, layers, features, out_channels) -> ViTVariant:
    return ViTVariant(name, dim, depth, heads, ffn, 518, layers, features, out_channels,
                      depth_input_size=518, depth_map_size=256, dino_input_size=448)


VARIANTS: dict[str, ViTVariant] = {
    v.name: v
    for v in (
        _real("vits", 384, 12, 6, "mlp", (2, 5, 8, 11), 64, (48, 96, 192, 384)),
        _real("vitb", 768, 12, 12, "mlp", (2, 5, 8, 11), 128, (96, 192, 384, 768)),
        _real("vitl", 1024, 24, 16, "mlp", (4, 11, 17, 23), 256, (256, 512, 1024, 1024)),
        _real("vitg", 1536, 40, 24, "swiglu", (9, 19, 29, 39), 384, (1536, 1536, 1536, 1536)),
        # The embedded default: CPU-sized, with DINO below the pretrain size so the
        # position-embedding interpolation path runs as it does at real sizes (448 < 518).
        ViTVariant("vit_tiny", 32, 4, 2, "mlp", 112, (0, 1, 2, 3), 16, (8, 16, 32, 32),
                   depth_input_size=112, depth_map_size=64, dino_input_size=98),
    )
}


def get_variant(name: str) -> ViTVariant:
    """``vitl``, ``vit_l``, ``vitl14`` and ``ViT-L`` all name the same variant."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    key = key.removesuffix("14")
    aliases = {"vittiny": "vit_tiny", "tiny": "vit_tiny"}
    key = aliases.get(key, key)
    if key not in VARIANTS:
        raise KeyError(f"unknown ViT variant {name!r} (known: {sorted(VARIANTS)})")
    return VARIANTS[key]


def variant_for_embed_dim(embed_dim: int) -> ViTVariant:
    for v in VARIANTS.values():
        if v.embed_dim == embed_dim:
            return v
    raise KeyError(f"no ViT variant with embed_dim {embed_dim} (known: "
                   f"{ {v.name: v.embed_dim for v in VARIANTS.values()} })")


def resolve_variant(variant_name: str, embed_dim: int, source: str | Path, anchor: str) -> ViTVariant:
    """The configured variant (checked against the checkpoint's ``embed_dim``), or the one of that width."""
    if not variant_name:
        return variant_for_embed_dim(embed_dim)
    variant = get_variant(variant_name)
    if variant.embed_dim != embed_dim:
        raise ValueError(f"{source}: embed_dim {embed_dim} does not match variant {variant.name!r} "
                         f"({variant.embed_dim}); fix precompute.checkpoints.{anchor}.variant")
    return variant


# ----------------------------------------------------------------------- modules
class PatchEmbed(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, PATCH_SIZE, PATCH_SIZE)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D), row-major patches


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, value = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gate) * value)


class LayerScale(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    def __init__(self, v: ViTVariant):
        super().__init__()
        d = v.embed_dim
        self.norm1 = nn.LayerNorm(d, eps=1e-6)
        self.attn = Attention(d, v.num_heads)
        self.ls1 = LayerScale(d)
        self.norm2 = nn.LayerNorm(d, eps=1e-6)
        self.mlp = SwiGLU(d, v.mlp_hidden) if v.ffn == "swiglu" else Mlp(d, v.mlp_hidden)
        self.ls2 = LayerScale(d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoVisionTransformer(nn.Module):
    """DINOv2 backbone; ``forward_layers`` returns normed tokens (CLS, registers, patches)."""

    # the original's conventions for resizing the position grid to another input size
    interpolate_offset = 0.1
    interpolate_antialias = False

    def __init__(self, variant: ViTVariant, num_register_tokens: int = 0):
        super().__init__()
        self.variant = variant
        d = variant.embed_dim
        grid = variant.pretrain_size // PATCH_SIZE
        self.num_register_tokens = num_register_tokens
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, d))
        self.mask_token = nn.Parameter(torch.zeros(1, d))  # unused at inference; kept to load strictly
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, d))
        self.patch_embed = PatchEmbed(d)
        self.blocks = nn.ModuleList(Block(variant) for _ in range(variant.depth))
        self.norm = nn.LayerNorm(d, eps=1e-6)

    @property
    def num_prefix_tokens(self) -> int:
        return 1 + self.num_register_tokens

    def position_embedding(self, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        pos = self.pos_embed.float()
        grid_tokens = pos.shape[1] - 1
        grid = int(math.sqrt(grid_tokens))
        if rows == cols == grid:
            return pos.to(dtype)
        d = pos.shape[-1]
        patch_pos = pos[:, 1:].reshape(1, grid, grid, d).permute(0, 3, 1, 2)
        # As the original: a scale factor of (n + 0.1) / grid rather than an output size,
        # which shifts the sampling positions slightly; the golden 448 tokens depend on it.
        scale = ((rows + self.interpolate_offset) / grid, (cols + self.interpolate_offset) / grid)
        patch_pos = F.interpolate(patch_pos, scale_factor=scale, mode="bicubic",
                                  antialias=self.interpolate_antialias)
        if patch_pos.shape[-2:] != (rows, cols):
            raise RuntimeError(f"position grid resized to {tuple(patch_pos.shape[-2:])}, expected {(rows, cols)}")
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, rows * cols, d)
        return torch.cat([pos[:, :1], patch_pos], dim=1).to(dtype)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if h % PATCH_SIZE or w % PATCH_SIZE:
            raise ValueError(f"input {h}x{w} is not a multiple of the patch size {PATCH_SIZE}")
        tokens = self.patch_embed(x)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = tokens + self.position_embedding(h // PATCH_SIZE, w // PATCH_SIZE, tokens.dtype)
        if self.num_register_tokens:
            regs = self.register_tokens.expand(b, -1, -1).to(tokens.dtype)
            tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)
        return tokens

    def forward_layers(self, x: torch.Tensor, layers: Sequence[int]) -> list[torch.Tensor]:
        """Final-norm'ed outputs of the given blocks (0-based), each ``(B, T, D)``."""
        wanted = sorted(set(layers))
        if wanted and (wanted[0] < 0 or wanted[-1] >= len(self.blocks)):
            raise ValueError(f"layers {list(layers)} out of range for {len(self.blocks)} blocks")
        x = self.prepare_tokens(x)
        taken: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks[: wanted[-1] + 1]):
            x = block(x)
            if i in wanted:
                taken[i] = self.norm(x)
        return [taken[i] for i in layers]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Final-norm tokens ``(B, T, D)``: CLS, registers, patches."""
        return self.forward_layers(x, [len(self.blocks) - 1])[0]


def infer_register_tokens(state_dict: dict[str, torch.Tensor], prefix: str = "") -> int:
    t = state_dict.get(prefix + "register_tokens")
    return 0 if t is None else int(t.shape[1])


# ------------------------------------------------------------- checkpoint helpers
class CheckpointFormatError(ValueError):
    """A checkpoint file whose keys or shapes do not fit the architecture."""


def unwrap_state_dict(obj) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint: accepts a plain state dict, ``{'state_dict'|'model': ...}``
    wrappers and DataParallel's ``module.`` prefixes."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise CheckpointFormatError(f"expected a state dict, got {type(obj).__name__}")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    return unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def load_strict(module: nn.Module, state_dict: dict[str, torch.Tensor], source: str | Path) -> None:
    """Load every tensor; any missing, unexpected or mis-shaped key is an error naming them."""
    own = module.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f"{k} {tuple(state_dict[k].shape)} != {tuple(own[k].shape)}"
             for k in own if k in state_dict and state_dict[k].shape != own[k].shape]

    def few(keys):
        return ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")

    problems = []
    if missing:
        problems.append(f"missing keys: {few(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {few(unexpected)}")
    if wrong:
        problems.append(f"shape mismatches (file != model): {few(wrong)}")
    if problems:
        raise CheckpointFormatError(f"{source}: does not fit {type(module).__name__}: " + "; ".join(problems))
    module.load_state_dict(state_dict, strict=True)


def randomize_(module: nn.Module, seed: int) -> nn.Module:
    """Seeded random weights for the tiny embedded default: PyTorch's default layer
    init plus small normal tokens/position embeddings (zeros would make every token equal)."""
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        for m in module.modules():
            if hasattr(m, "reset_parameters") and m is not module:
                m.reset_parameters()
        for name, p in module.named_parameters():
            if name.rsplit(".", 1)[-1] in ("cls_token", "pos_embed", "mask_token", "register_tokens"):
                nn.init.normal_(p, std=0.02)
    finally:
        torch.random.set_rng_state(gen_state)
    return module


# ------------------------------------------------------------------ preprocessing
def normalize_views(views: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """uint8 ``(B, S, S, 3)`` RGB -> float32 ``(B, 3, S, S)``, /255 then ImageNet mean/std."""
    if views.dtype != torch.uint8 or views.ndim != 4 or views.shape[-1] != 3:
        raise ValueError(f"expected uint8 (B, S, S, 3) views, got {views.dtype} {tuple(views.shape)}")
    x = views.permute(0, 3, 1, 2).float().div_(255.0)
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s


def check_view_size(views: torch.Tensor, size: int, anchor: str) -> None:
    if views.shape[1:3] != (size, size):
        raise ValueError(f"{anchor}: expected {size}x{size} views, got {tuple(views.shape[1:3])}")


def prepare_views(views: torch.Tensor, module: nn.Module, size: int, anchor: str) -> torch.Tensor:
    """``anchor``'s checked ``size`` x ``size`` uint8 views, normalised on ``module``'s device."""
    check_view_size(views, size, anchor)
    return normalize_views(views.to(next(module.parameters()).device))


