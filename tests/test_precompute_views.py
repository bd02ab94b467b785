"""precompute.views: the square view by default; ``reference`` reproduces the reference's anchor inputs."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from covt.config import load_config
from covt.images import square_view
from precompute.views import make_view, view_key

REPO = Path(__file__).resolve().parents[1]
PHOTOS = sorted((REPO / "data/sample/images").glob("*.jpg"))  # square and landscape ones


def photos():
    return [Image.open(p).convert("RGB") for p in PHOTOS]


def pixels(processor, image) -> np.ndarray:
    """A transformers image processor's output before rescaling/normalising, as (H, W, 3)."""
    return np.asarray(processor(images=image, return_tensors="np")["pixel_values"][0]).transpose(1, 2, 0)


def test_square_mode_is_the_square_view_for_every_anchor():
    image = photos()[1]
    for anchor in ("sam", "depth", "dino", "pidinet", "siglip", "metaclip"):
        assert view_key(anchor, 64, "square") == ("square", 64)
        np.testing.assert_array_equal(make_view(image, view_key(anchor, 64, "square")), square_view(image, 64))


def test_reference_dino_is_dinov2_large_processor_with_crop_448_zero_padded():
    processor = BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 448, "width": 448},
                                     do_rescale=False, do_normalize=False)
    for image in photos():
        view = make_view(image, view_key("dino", 448, "reference"))
        np.testing.assert_array_equal(view, pixels(processor, image))
        assert (view[:90] == 0).all() and (view[-90:] == 0).all()  # 256 rows of image inside 448: padding


def test_reference_metaclip_and_siglip_are_their_processors():
    clip = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224},
                                 do_rescale=False, do_normalize=False)
    siglip = SiglipImageProcessorPil(size={"height": 256, "width": 256}, resample=2, do_rescale=False,
                                     do_normalize=False)  # google/siglip2-large-patch16-256's settings
    for image in photos():
        np.testing.assert_array_equal(make_view(image, view_key("metaclip", 224, "reference")), pixels(clip, image))
        np.testing.assert_array_equal(make_view(image, view_key("siglip", 256, "reference")), pixels(siglip, image))


def test_reference_sam_is_the_256_thumbnail_through_sams_resize():
    for image in photos():
        thumbnail = np.array(image.resize((256, 256)))  # the reference's encode_image
        expected = ResizeLongestSide(1024).apply_image(thumbnail)  # SamPredictor.set_image
        np.testing.assert_array_equal(make_view(image, view_key("sam", 1024, "reference")), expected)


def test_reference_depth_is_the_upscaled_256_thumbnail_in_bgr():
    image = Image.new("RGB", (300, 200), (200, 30, 10))  # red
    view = make_view(image, view_key("depth", 518, "reference"))
    assert view.shape == (518, 518, 3) and tuple(view[259, 259]) == (10, 30, 200)  # blue: channels reversed
    photo = photos()[1]
    thumbnail = photo.resize((256, 256), Image.BICUBIC).resize((518, 518), Image.BICUBIC)
    np.testing.assert_array_equal(make_view(photo, view_key("depth", 518, "reference"))[..., ::-1],
                                  np.asarray(thumbnail))


def test_unknown_anchor_or_mode_is_a_clear_error():
    with pytest.raises(ValueError, match="no reference input known for anchor 'sd'"):
        view_key("sd", 64, "reference")
    with pytest.raises(ValueError, match="precompute.views"):
        view_key("sam", 64, "thumbnail")
    with pytest.raises(Exception, match="precompute.views"):
        load_config(REPO / "configs/tiny.yaml", ["precompute.views=thumbnail"])


@pytest.mark.slow
def test_precompute_with_reference_views_records_them_and_changes_the_targets(tmp_path):
    from precompute.run import precompute
    from shards.reader import Cache

    def run(views: str) -> Cache:
        cfg = load_config(REPO / "configs/tiny.yaml", [
            f"cache.dir={tmp_path / views}", "cache.shard_size=2", "data.limit=2", "anchors=[dino]",
            f"data.path={REPO / 'data/sample/conversations.json'}", f"data.image_folder={REPO / 'data/sample/images'}",
            f"precompute.checkpoints.dino.path={tmp_path / 'dino.pth'}", "precompute.num_workers=0",
            "precompute.device=cpu", f"precompute.views={views}"])
        precompute(cfg)
        return Cache(tmp_path / views)

    square, reference = run("square"), run("reference")
    manifest = json.loads((tmp_path / "reference" / "manifest.json").read_text())
    assert "zero padding" in json.dumps(manifest["anchors"]["dino"])
    assert "views" not in json.dumps(json.loads((tmp_path / "square" / "manifest.json").read_text())["anchors"])
    a, b = square.sample(0)["targets"]["dino"]["features"], reference.sample(0)["targets"]["dino"]["features"]
    assert a.shape == b.shape and not np.allclose(a.float().numpy(), b.float().numpy())
