"""SigLIP and MetaCLIP anchors: one pooled image embedding per image from a Hugging Face folder.

Input: the square view at the folder's processor size (``preprocessor_config.json``:
``crop_size`` when the processor centre-crops, else ``size``; SigLIP 2 large
patch16-256: 256, MetaCLIP H/14: 224), rescaled to [0, 1] and normalised with the
processor's mean/std. Because the view is already square at that size, the processor's
resize and centre crop are identities and are skipped.

Targets: ``embedding`` = SigLIP's ``pooler_output`` (the attention-pooling head; what
``SiglipModel.get_image_features`` returns, the reference's target; 1024-d for SigLIP 2
large), MetaCLIP's ``image_embeds`` (the projected embedding the contrastive loss uses,
1024-d for H/14). The reference's SigLIP is ``google/siglip2-large-patch16-256``: SigLIP 2
fixed-resolution checkpoints are published in SigLIP's architecture (config.json
``model_type: siglip``, ``SiglipModel``) and load as such; SigLIP 2 NaFlex folders
(``model_type: siglip2``, variable resolution) are not supported. MetaCLIP is a CLIP
architecture, loaded with ``CLIPVisionModelWithProjection``. Both load from the full
released folders (vision + text); the text tower's weights are ignored.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers

from covt.compute import autocast
from covt.config import CheckpointConfig, PrecomputeConfig
from covt.fs import atomic_dir

from .base import AnchorModel, MissingCheckpointError, to_host

TINY_TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 vocab_size=99, max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                   image_size=64, patch_size=16)


@dataclass(frozen=True)
class Family:
    anchor: str
    model_types: tuple[str, ...]  # config.json model_type values this loader accepts
    vision_model: str  # transformers class that loads the vision tower (+ projection)
    output: str  # field of its output that is the target embedding
    mean: tuple[float, float, float]  # fallbacks when the folder has no preprocessor_config.json
    std: tuple[float, float, float]
    where_to_get: str
    full_model: str  # tiny variant: the full (vision + text) model class and its config/processor
    config: str
    processor: str
    tiny_extra: dict

    def load_vision_model(self, folder: Path):
        config = transformers.AutoConfig.from_pretrained(folder)
        vision_config = getattr(config, "vision_config", config)
        if hasattr(config, "projection_dim"):  # set on the full config; the vision sub-config may lack it
            vision_config.projection_dim = config.projection_dim
        cls = getattr(transformers, self.vision_model)
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()  # the text tower's weights are expectedly unused
        try:
            return cls.from_pretrained(folder, config=vision_config, dtype=torch.float32)
        finally:
            transformers.logging.set_verbosity(verbosity)


FAMILIES = {
    "siglip": Family(
        "siglip", ("siglip",), "SiglipVisionModel", "pooler_output", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5),
        "https://huggingface.co/google/siglip2-large-patch16-256 (the reference's SigLIP; the whole folder, e.g. "
        "`huggingface-cli download google/siglip2-large-patch16-256 --local-dir PATH`)",
        "SiglipModel", "SiglipConfig", "SiglipImageProcessor", {},
    ),
    "metaclip": Family(
        "metaclip", ("clip",), "CLIPVisionModelWithProjection", "image_embeds",
        (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711),
        "https://huggingface.co/facebook/metaclip-h14-fullcc2.5b (the whole folder, e.g. "
        "`huggingface-cli download facebook/metaclip-h14-fullcc2.5b --local-dir PATH`)",
        "CLIPModel", "CLIPConfig", "CLIPImageProcessor", {"projection_dim": 24},
    ),
}


def write_tiny_model(folder: Path, family: Family, seed: int) -> None:
    """A seeded random tiny model of the family's full architecture, saved like the released folders."""
    config = getattr(transformers, family.config)(text_config=TINY_TEXT, vision_config=TINY_VISION,
                                                  **family.tiny_extra)
    with torch.random.fork_rng(devices=[]):  # seeded without moving the caller's RNG
        torch.manual_seed(seed)
        model = getattr(transformers, family.full_model)(config)
    size = TINY_VISION["image_size"]
    processor = getattr(transformers, family.processor)(
        **({"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
           if family.processor == "CLIPImageProcessor" else {"size": {"height": size, "width": size}}),
        image_mean=list(family.mean), image_std=list(family.std),
    )
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)


def preprocessing_of(folder: Path, model_image_size: int, family: Family) -> dict:
    """Input side, rescale factor, mean and std from the folder's preprocessor_config.json."""
    proc_file = folder / "preprocessor_config.json"
    proc = json.loads(proc_file.read_text()) if proc_file.is_file() else {}
    size = None
    if proc.get("do_center_crop") and isinstance(proc.get("crop_size"), dict):
        size = proc["crop_size"].get("height")
    elif isinstance(proc.get("size"), dict):
        size = proc["size"].get("height") or proc["size"].get("shortest_edge")
    return {
        "size": int(size or model_image_size),
        "rescale_factor": float(proc.get("rescale_factor", 1 / 255)),
        "mean": [float(v) for v in proc.get("image_mean", family.mean)],
        "std": [float(v) for v in proc.get("image_std", family.std)],
        "source": proc_file.name if proc else "model config + family defaults",
    }


class PooledEmbeddingAnchor(AnchorModel):
    def __init__(self, name: str, model, family: Family, prep: dict, *, checkpoint: str, sha256: str | None = None,
                 bf16: bool):
        super().__init__()
        self.name = name
        self.model = model.eval().requires_grad_(False)
        self.family = family
        self.prep = prep
        self.input_size = prep["size"]
        self.checkpoint = checkpoint
        self._checkpoint_sha256 = sha256  # None: hashed when first fingerprinted (rank 0 only)
        self.bf16 = bf16
        self.register_buffer("mean", torch.tensor(prep["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(prep["std"]).view(1, 3, 1, 1), persistent=False)
        projection = getattr(model, "visual_projection", None)
        self._dim = int(projection.out_features if projection is not None else model.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def dims(self) -> dict[str, int]:
        return {"dim": self._dim}

    def pixel_values(self, views: torch.Tensor) -> torch.Tensor:
        x = views.to(self.device).permute(0, 3, 1, 2).float() * self.prep["rescale_factor"]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def embed(self, views: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.bf16):
            out = self.model(pixel_values=self.pixel_values(views))
        return getattr(out, self.family.output).float()

    def compute(self, views: torch.Tensor) -> dict[str, np.ndarray]:
        return to_host({"embedding": self.embed(views)})

    def fingerprint(self) -> dict:
        return {
            **self.checkpoint_fields(self.checkpoint),
            "model_class": self.family.vision_model,
            "model_type": self.model.config.model_type,
            "output": self.family.output,
            "preprocessing": (
                f"square view {self.input_size}x{self.input_size} (bicubic, from the original), "
                f"x * {self.prep['rescale_factor']:.6g}, mean {self.prep['mean']}, std {self.prep['std']} "
                f"(from {self.prep['source']})"
            ),
            "dtype": "bf16" if self.bf16 and self.device.type == "cuda" else "fp32",
            "versions": {"transformers": transformers.__version__, "torch": torch.__version__},
        }


def load_pooled_embedding_anchor(name: str, ckpt: CheckpointConfig, pre: PrecomputeConfig,
                                 device: torch.device) -> PooledEmbeddingAnchor:
    family = FAMILIES[name]
    folder = Path(ckpt.path)
    if not (folder / "config.json").is_file():
        if ckpt.random_init_seed is None or folder.exists():
            raise MissingCheckpointError(name, f"{folder} (a Hugging Face folder with config.json)",
                                         f"precompute.checkpoints.{name}.path", family.where_to_get)
        folder.parent.mkdir(parents=True, exist_ok=True)
        write_tiny_model(folder, family, ckpt.random_init_seed)
    model_type = json.loads((folder / "config.json").read_text()).get("model_type")
    if model_type not in family.model_types:
        hint = (" (Siglip2 NaFlex folders are not supported; use a fixed-resolution SigLIP/SigLIP2 folder)"
                if model_type == "siglip2" else "")
        raise ValueError(f"{name}: {folder}/config.json has model_type {model_type!r}, expected one of "
                         f"{list(family.model_types)}{hint}")
    model = family.load_vision_model(folder)
    vision_config = getattr(model.config, "vision_config", model.config)
    prep = preprocessing_of(folder, vision_config.image_size, family)
    return PooledEmbeddingAnchor(name, model, family, prep, checkpoint=str(folder),
                                 bf16=pre.dtype == "bf16").to(device)


def load_siglip(ckpt: CheckpointConfig, pre: PrecomputeConfig, device: torch.device) -> PooledEmbeddingAnchor:
    return load_pooled_embedding_anchor("siglip", ckpt, pre, device)


def load_metaclip(ckpt: CheckpointConfig, pre: PrecomputeConfig, device: torch.device) -> PooledEmbeddingAnchor:
    return load_pooled_embedding_anchor("metaclip", ckpt, pre, device)
