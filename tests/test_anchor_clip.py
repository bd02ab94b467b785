"""SigLIP / MetaCLIP anchors: tiny folders in the released layout, embeddings equal transformers' own."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from covt.anchors import array_shape
from covt.config import load_config
from covt.images import square_view
from precompute.anchors import load_anchor
from precompute.anchors.base import MissingCheckpointError

PHOTOS = sorted((Path(__file__).resolve().parents[1] / "data/sample/images").glob("*.jpg"))


def load(name: str, folder: Path, *overrides: str):
    cfg = load_config("configs/tiny.yaml", [f"precompute.checkpoints.{name}.path={folder}", *overrides])
    return load_anchor(name, cfg.precompute, torch.device("cpu"))


def reference_embedding(name: str, folder: Path, images: list[Image.Image]) -> np.ndarray:
    """The embedding through transformers' full model and the folder's own image processor."""
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        if name == "siglip":
            model = transformers.SiglipModel.from_pretrained(folder).eval()
            return model.vision_model(pixel_values=pixel_values).pooler_output.numpy()
        model = transformers.CLIPModel.from_pretrained(folder).eval()
        pooled = model.vision_model(pixel_values=pixel_values).pooler_output
        return model.visual_projection(pooled).numpy()


@pytest.mark.parametrize("name,dim", [("siglip", 32), ("metaclip", 24)])
def test_embedding_equals_transformers_forward(name, dim, tmp_path):
    anchor = load(name, tmp_path / name)
    assert (tmp_path / name / "preprocessor_config.json").is_file()
    assert anchor.dims() == {"dim": dim} and anchor.input_size == 64
    images = [Image.open(p).convert("RGB") for p in PHOTOS[:3]]
    square = [square_view(im, anchor.input_size) for im in images]
    out = anchor.compute(torch.from_numpy(np.stack(square)))["embedding"]
    assert out.shape == (3, *array_shape(name, "embedding", anchor.dims())) and out.dtype == np.float32
    ref = reference_embedding(name, tmp_path / name, [Image.fromarray(s) for s in square])
    np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-4)
    assert np.abs(out[0] - out[1]).max() > 1e-3  # different photos, different embeddings
    assert anchor.fingerprint()["sha256"]


def test_reloading_an_existing_folder_gives_the_same_model(tmp_path):
    views = torch.from_numpy(np.stack([square_view(Image.open(PHOTOS[0]), 64)]))
    first = load("siglip", tmp_path / "s").compute(views)["embedding"]
    again = load("siglip", tmp_path / "s", "precompute.checkpoints.siglip.random_init_seed=null").compute(views)
    np.testing.assert_array_equal(first, again["embedding"])


@pytest.mark.parametrize("name,where", [("siglip", "google/siglip2-large-patch16-256"),
                                        ("metaclip", "facebook/metaclip-h14-fullcc2.5b")])
def test_missing_folder_names_it_and_where_to_get_it(name, where, tmp_path):
    with pytest.raises(MissingCheckpointError) as e:
        load(name, tmp_path / "nowhere", f"precompute.checkpoints.{name}.random_init_seed=null")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and where in msg and f"precompute.checkpoints.{name}.path" in msg


def write_siglip2_fixed_resolution_folder(folder: Path, size: int = 64) -> None:
    """A random tiny folder laid out as google/siglip2-large-patch16-256 is: SigLIP architecture
    (model_type siglip, SiglipModel), a fixed-size SiglipImageProcessor (bilinear, mean/std 0.5)."""
    config = transformers.SiglipConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                         vocab_size=256, max_position_embeddings=64),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                           image_size=size, patch_size=16))
    torch.manual_seed(0)
    transformers.SiglipModel(config).save_pretrained(folder)
    transformers.SiglipImageProcessor(size={"height": size, "width": size}, resample=2, image_mean=[0.5] * 3,
                                      image_std=[0.5] * 3).save_pretrained(folder)


def test_a_siglip2_fixed_resolution_folder_loads_and_gives_get_image_features(tmp_path):
    folder = tmp_path / "siglip2-large-patch16-256"
    write_siglip2_fixed_resolution_folder(folder)
    anchor = load("siglip", folder, "precompute.checkpoints.siglip.random_init_seed=null")
    assert anchor.input_size == 64 and anchor.dims() == {"dim": 48}
    square = [square_view(Image.open(p).convert("RGB"), 64) for p in PHOTOS[:2]]
    out = anchor.compute(torch.from_numpy(np.stack(square)))["embedding"]
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    assert type(model).__name__ == "SiglipModel"  # what the reference's AutoModel.from_pretrained gives
    with torch.no_grad():  # the reference's target: get_image_features of the processor's input
        ref = model.get_image_features(**processor(images=[Image.fromarray(s) for s in square], return_tensors="pt"))
    np.testing.assert_allclose(out, ref.pooler_output.numpy(), atol=1e-5, rtol=1e-4)


def test_a_siglip2_naflex_folder_is_a_clear_error(tmp_path):
    folder = tmp_path / "siglip2-naflex"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "siglip2"}')
    with pytest.raises(ValueError, match="NaFlex"):
        load("siglip", folder, "precompute.checkpoints.siglip.random_init_seed=null")


def test_the_7b_recipe_uses_the_references_siglip(repo_root):
    cfg = load_config(repo_root / "configs/covt_7b_all.yaml")
    assert Path(cfg.precompute.checkpoints["siglip"].path).name == "siglip2-large-patch16-256"
