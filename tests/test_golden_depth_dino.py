"""Depth Anything V2 / DINOv2 against the original implementation's outputs (../shared/golden).

The golden arrays were computed in fp32 from a random-weight ViT-S checkpoint
stored in fp16; we load the same file, so in fp32 on the same input tensors the
only differences are summation order (SDPA vs explicit softmax, conv
algorithms): observed max abs error ~4e-6 on tokens of magnitude ~5 and
~2e-7 on depth. Tolerances of 1e-4 leave room for other BLAS builds and would
still catch any real mistake (a wrong layer, norm, or position grid shifts
tokens by >1e-1).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from covt.config import CheckpointConfig, PrecomputeConfig
from covt.images import square_view
from precompute.anchors.depth import DepthAnythingV2, build_depth_model, load_depth
from precompute.anchors.dino import DinoAnchor, HubDino
from precompute.anchors.vit import normalize_views, read_checkpoint

GOLDEN = Path(__file__).resolve().parents[2] / "shared" / "golden" / "depth_anything_v2"
CKPT = GOLDEN / "depth_anything_v2_vits_random.pth"
NPZ = GOLDEN / "depth_anything_v2_vits_random_golden.npz"
KEYS_JSON = GOLDEN / "depth_anything_v2_vitl_keys.json"
PHOTOS = ("astronaut", "chelsea")
LAYERS = (2, 5, 8, 11)

# 78 MB (a ViT-S checkpoint and its outputs): kept outside the repository, beside it (tests/golden/README.md)
needs_golden = pytest.mark.skipif(not NPZ.is_file(), reason=f"golden Depth Anything V2 outputs not found at {GOLDEN} "
                                  "(78 MB, kept outside the repository; tests/golden/README.md)")


@pytest.fixture(scope="module")
def golden():
    return np.load(NPZ)


@pytest.fixture(scope="module")
def model() -> DepthAnythingV2:
    return build_depth_model(read_checkpoint(CKPT), CKPT).eval()


@pytest.fixture(scope="module")
def outputs_518(model, golden):
    x = torch.from_numpy(np.stack([golden[f"{p}.input_518"] for p in PHOTOS]))
    with torch.no_grad():
        return model(x)


@needs_golden
def test_intermediate_layer_tokens_match_original(outputs_518, golden):
    layers, _ = outputs_518
    for i, layer in enumerate(LAYERS):
        for b, photo in enumerate(PHOTOS):
            np.testing.assert_allclose(layers[i][b, 1:].numpy(), golden[f"{photo}.layer{layer}_patch"],
                                       atol=1e-4, rtol=0)
            np.testing.assert_allclose(layers[i][b, 0].numpy(), golden[f"{photo}.layer{layer}_cls"], atol=1e-4, rtol=0)


@needs_golden
def test_relative_depth_matches_original(outputs_518, golden):
    _, depth = outputs_518
    for b, photo in enumerate(PHOTOS):
        expected = golden[f"{photo}.depth_518"]
        assert expected.max() > 0  # a zero map would make the comparison meaningless
        np.testing.assert_allclose(depth[b].numpy(), expected, atol=1e-5, rtol=0)


@needs_golden
def test_dino_448_tokens_match_original_position_interpolation(model, golden):
    # the same backbone used as a plain DINOv2 at 448: the 37x37 grid is resized with
    # the original's bicubic (n + 0.1) / 37 scale factor; an output-size resize is off by ~0.1
    x = torch.from_numpy(np.stack([golden[f"{p}.input_448"] for p in PHOTOS]))
    with torch.no_grad():
        tokens = HubDino(model.pretrained)(x)
    assert tokens.shape == (2, 1 + 32 * 32, 384)
    for b, photo in enumerate(PHOTOS):
        np.testing.assert_allclose(tokens[b, 0].numpy(), golden[f"{photo}.dino448_norm_cls"], atol=1e-4, rtol=0)
        np.testing.assert_allclose(tokens[b, 1:].numpy(), golden[f"{photo}.dino448_norm_patch"], atol=1e-4, rtol=0)


@needs_golden
def test_dino_anchor_compute_matches_golden_tokens_from_its_own_preprocessing(model, golden):
    # DinoAnchor normalises uint8 views itself; feed it the golden input de-normalised to
    # uint8 so only the 1/255 quantisation (< 0.5/255/0.224 ~ 0.009 per pixel) separates
    # them. Measured: 0.7% relative (Frobenius) through 12 random-weight blocks; bound 1%.
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    views = np.stack([np.round((golden[f"{p}.input_448"] * std + mean) * 255).clip(0, 255).astype(np.uint8)
                      .transpose(1, 2, 0) for p in PHOTOS])
    anchor = DinoAnchor(HubDino(model.pretrained), 448, "vits", str(CKPT), "fp32")
    features = anchor.compute(torch.from_numpy(views))["features"]
    expected = np.stack([np.concatenate([golden[f"{p}.dino448_norm_cls"][None], golden[f"{p}.dino448_norm_patch"]])
                         for p in PHOTOS])
    rel = np.linalg.norm(features - expected) / np.linalg.norm(expected)
    assert rel < 1e-2, rel


@pytest.fixture(scope="module")
def views_518(golden) -> torch.Tensor:
    """Our square views (PIL bicubic, uint8) of the golden 256x256 photos."""
    return torch.from_numpy(np.stack([square_view(Image.fromarray(golden[f"{p}.image_rgb256"]), 518) for p in PHOTOS]))


@pytest.fixture(scope="module")
def own_outputs_518(model, views_518):
    with torch.no_grad():
        return model(normalize_views(views_518))


@needs_golden
def test_own_preprocessing_from_256_photo_is_close_to_original_resize(views_518, own_outputs_518, golden):
    # The original resizes with cv2 INTER_CUBIC (a=-0.75) on floats; we resize with PIL
    # bicubic (a=-0.5) to uint8. Measured: mean abs input difference ~0.01 (normalised
    # units, ~0.8/255), features ~2% relative (Frobenius), depth within ~2.5% of its
    # range. Bounds below are ~1.5x those: the same image, not a numerical identity.
    x = normalize_views(views_518).numpy()
    for b, photo in enumerate(PHOTOS):
        assert np.abs(x[b] - golden[f"{photo}.input_518"]).mean() < 0.02
    layers, depth = own_outputs_518
    for i, layer in enumerate(LAYERS):
        expected = np.stack([golden[f"{p}.layer{layer}_patch"] for p in PHOTOS])
        rel = np.linalg.norm(layers[i][:, 1:].numpy() - expected) / np.linalg.norm(expected)
        assert rel < 0.03, (layer, rel)
    for b, photo in enumerate(PHOTOS):
        expected = golden[f"{photo}.depth_518"]
        assert np.abs(depth[b].numpy() - expected).max() < 0.04 * (expected.max() - expected.min())


@needs_golden
def test_depth_loader_targets_are_layer_patches_and_raw_depth(views_518, own_outputs_518):
    anchor = load_depth(CheckpointConfig(path=str(CKPT)), PrecomputeConfig(dtype="fp32"), torch.device("cpu"))
    assert anchor.variant.name == "vits" and anchor.input_size == 518
    out = anchor.compute(views_518)
    assert out["features"].shape == (2, 4, 1369, 384) and out["depth"].shape == (2, 256, 256)
    layers, depth = own_outputs_518
    for i in range(4):
        np.testing.assert_allclose(out["features"][:, i], layers[i][:, 1:].numpy(), atol=1e-4, rtol=0)
    # the reference's target: the raw 518 depth (ReLU'd, not normalised) resized with align_corners=True
    expected = torch.nn.functional.interpolate(depth[:, None], (256, 256), mode="bilinear", align_corners=True)[:, 0]
    assert expected.max() > 0
    np.testing.assert_allclose(out["depth"], expected.numpy(), atol=1e-5, rtol=1e-5)
