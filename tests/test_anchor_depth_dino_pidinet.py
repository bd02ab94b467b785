"""Depth / DINO / PIDINet anchors: tiny checkpoints, shapes, errors, pixel-difference convs, export."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from covt.anchors import array_shape, get_anchor
from covt.config import CheckpointConfig, ConfigError, PrecomputeConfig, load_config
from precompute.anchors import LOADERS, load_anchor
from precompute.anchors.base import MissingCheckpointError
from precompute.anchors.depth import DepthAnchor, DepthAnythingV2, load_depth
from precompute.anchors.dino import DinoAnchor, HubDino, load_dino
from precompute.anchors.pidinet import PixelDifferenceConv2d, build_pidinet, load_pidinet
from precompute.anchors.vit import CheckpointFormatError, DinoVisionTransformer, get_variant, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
PIDINET_CKPT = REPO / "data" / "checkpoints" / "table5_baseline.pth"
CPU = torch.device("cpu")


def tiny_config(tmp_path: Path, name: str) -> CheckpointConfig:
    """The embedded default's checkpoint entry, redirected into tmp_path."""
    ckpt = load_config(REPO / "configs" / "tiny.yaml").precompute.checkpoints[name]
    return CheckpointConfig(path=str(tmp_path / Path(ckpt.path).name), variant=ckpt.variant,
                            random_init_seed=ckpt.random_init_seed)


def random_views(n: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=g)


def assert_targets_fit_spec(anchor, out: dict[str, np.ndarray], batch: int) -> None:
    spec = get_anchor(anchor.name)
    assert sorted(out) == sorted(a.name for a in spec.arrays)
    for name, arr in out.items():
        assert arr.dtype == np.float32
        assert arr.shape == (batch, *array_shape(anchor.name, name, anchor.dims()))
        assert np.isfinite(arr).all()


# ------------------------------------------------------------------ tiny variants
def test_tiny_depth_writes_release_layout_checkpoint_and_computes_spec_shapes(tmp_path):
    cfg = tiny_config(tmp_path, "depth")
    anchor = load_depth(cfg, PrecomputeConfig(), CPU)
    keys = read_checkpoint(cfg.path).keys()
    assert {k.split(".")[0] for k in keys} == {"pretrained", "depth_head"}
    assert "pretrained.blocks.0.attn.qkv.weight" in keys and "depth_head.scratch.refinenet4.out_conv.weight" in keys
    out = anchor.compute(random_views(3, anchor.input_size))
    assert_targets_fit_spec(anchor, out, 3)
    depth = out["depth"]
    assert (depth >= 0).all() and (depth.std(axis=(1, 2)) > 0).all()  # raw ReLU'd depth, non-degenerate
    # a second load reads the file written by the first and computes the same targets
    again = load_depth(cfg, PrecomputeConfig(), CPU).compute(random_views(3, anchor.input_size))
    np.testing.assert_array_equal(again["features"], out["features"])
    assert anchor.fingerprint()["sha256"] and anchor.fingerprint()["variant"] == "vit_tiny"


def test_tiny_dino_writes_hub_layout_checkpoint_and_computes_spec_shapes(tmp_path):
    cfg = tiny_config(tmp_path, "dino")
    anchor = load_anchor("dino", PrecomputeConfig(checkpoints={"dino": cfg}), CPU)
    keys = read_checkpoint(cfg.path).keys()
    assert {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "norm.weight"} <= set(keys)
    out = anchor.compute(random_views(2, anchor.input_size))
    assert_targets_fit_spec(anchor, out, 2)
    assert anchor.dims()["tokens"] == 1 + (anchor.input_size // 14) ** 2


def test_a_compiled_anchor_computes_the_eager_targets_under_the_same_parameter_names(tmp_path):
    """precompute.compile_anchors: the network through torch.compile in place (its first batch compiles)."""
    cfg = tiny_config(tmp_path, "dino")
    eager = load_anchor("dino", PrecomputeConfig(checkpoints={"dino": cfg}), CPU)
    compiled = load_anchor("dino", PrecomputeConfig(checkpoints={"dino": cfg}, compile_anchors=["dino"]), CPU)
    views = random_views(2, eager.input_size)
    np.testing.assert_allclose(compiled.compute(views)["features"], eager.compute(views)["features"],
                               rtol=1e-4, atol=1e-5)
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert compiled.fingerprint() == eager.fingerprint()
    with pytest.raises(ConfigError, match=r"precompute.compile_anchors\[0\]: 'sam' is not one of"):
        load_config(REPO / "configs" / "tiny.yaml", ["precompute.compile_anchors=[sam]"])  # its own switches


def test_same_seed_writes_same_random_weights(tmp_path):
    cfg_a, cfg_b = tiny_config(tmp_path / "a", "dino"), tiny_config(tmp_path / "b", "dino")
    load_dino(cfg_a, PrecomputeConfig(), CPU), load_dino(cfg_b, PrecomputeConfig(), CPU)
    a, b = read_checkpoint(cfg_a.path), read_checkpoint(cfg_b.path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_real_variants_use_real_input_and_target_sizes():
    with torch.device("meta"):
        depth = DepthAnchor(DepthAnythingV2(get_variant("vitl")), "depth_anything_v2_vitl.pth", "bf16")
        dino = DinoAnchor(HubDino(DinoVisionTransformer(get_variant("vitl14"))), 448, "vitl", "x.pth", "bf16")
    assert depth.input_size == 518 and depth.variant.depth_layers == (4, 11, 17, 23)
    assert array_shape("depth", "features", depth.dims()) == (4, 1369, 1024)
    assert array_shape("depth", "depth", depth.dims()) == (256, 256)
    assert array_shape("dino", "features", dino.dims()) == (1025, 1024)
    assert get_variant("vit_l").dino_input_size == 448


def test_dino_drops_register_tokens(tmp_path):
    torch.manual_seed(0)
    vit = DinoVisionTransformer(get_variant("vit_tiny"), num_register_tokens=4)
    path = tmp_path / "dinov2_vit_tiny_reg4.pth"
    torch.save(vit.state_dict(), path)
    anchor = load_dino(CheckpointConfig(path=str(path), variant="vit_tiny"), PrecomputeConfig(), CPU)
    views = random_views(1, anchor.input_size)
    feats = anchor.compute(views)["features"]
    assert feats.shape[1] == anchor.dims()["tokens"]


def test_dino_loads_hugging_face_folder(tmp_path):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    hf = Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, image_size=112, patch_size=14)).eval()
    hf.save_pretrained(tmp_path / "dinov2-tiny")
    checkpoint = CheckpointConfig(path=str(tmp_path / "dinov2-tiny"), variant="vit_tiny")
    anchor = load_dino(checkpoint, PrecomputeConfig(), CPU)
    views = random_views(2, anchor.input_size)
    out = anchor.compute(views)
    assert_targets_fit_spec(anchor, out, 2)
    x = (views.permute(0, 3, 1, 2).float() / 255 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) \
        / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expected = hf(pixel_values=x).last_hidden_state
    np.testing.assert_allclose(out["features"], expected.numpy(), atol=1e-5)


# ------------------------------------------------------------------------- errors
@pytest.mark.parametrize("anchor, url", [
    ("depth", "huggingface.co/depth-anything/Depth-Anything-V2-Large"),
    ("dino", "dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"),
    ("pidinet", "github.com/hellozhuo/pidinet"),
])
def test_missing_checkpoint_names_file_config_key_and_source(tmp_path, anchor, url):
    path = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(MissingCheckpointError) as err:
        LOADERS[anchor](CheckpointConfig(path=str(path), variant=""), PrecomputeConfig(), CPU)
    text = str(err.value)
    assert str(path) in text and f"precompute.checkpoints.{anchor}.path" in text and url in text
    assert not path.exists()  # no random weights without random_init_seed


def test_checkpoint_with_missing_or_unexpected_keys_is_rejected_by_name(tmp_path):
    cfg = tiny_config(tmp_path, "depth")
    load_depth(cfg, PrecomputeConfig(), CPU)
    sd = read_checkpoint(cfg.path)
    sd["depth_head.readout_projects.0.0.weight"] = torch.zeros(1)
    del sd["pretrained.norm.bias"]
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(CheckpointFormatError) as err:
        load_depth(CheckpointConfig(path=str(bad), variant="vit_tiny"), PrecomputeConfig(), CPU)
    text = str(err.value)
    assert str(bad) in text and "pretrained.norm.bias" in text and "depth_head.readout_projects.0.0.weight" in text


def test_variant_that_contradicts_the_file_is_an_error(tmp_path):
    cfg = tiny_config(tmp_path, "dino")
    load_dino(cfg, PrecomputeConfig(), CPU)
    with pytest.raises(ValueError, match="precompute.checkpoints.dino.variant"):
        load_dino(CheckpointConfig(path=cfg.path, variant="vitl"), PrecomputeConfig(), CPU)


# ------------------------------------------------------- pixel-difference convolutions
DIRECTIONS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]  # row-major, centre skipped
CLOCKWISE_NEXT = {(-1, -1): (-1, 0), (-1, 0): (-1, 1), (-1, 1): (0, 1), (0, 1): (1, 1),
                  (1, 1): (1, 0), (1, 0): (1, -1), (1, -1): (0, -1), (0, -1): (-1, -1), (0, 0): (0, 0)}


def shifted(x: torch.Tensor, dr: int, dc: int) -> torch.Tensor:
    """x[r + dr, c + dc] with zero padding."""
    p = F.pad(x, (2, 2, 2, 2))
    h, w = x.shape[-2:]
    return p[..., 2 + dr: 2 + dr + h, 2 + dc: 2 + dc + w]


def tap(weight: torch.Tensor, dr: int, dc: int) -> torch.Tensor:
    return weight[:, :, dr + 1, dc + 1]


def reference_pdc(x: torch.Tensor, weight: torch.Tensor, kind: str) -> torch.Tensor:
    """The paper's definitions, written out as sums of weighted pixel differences."""
    def weighted(w, diff):  # w (O, I), diff (B, I, H, W)
        return torch.einsum("oi,bihw->bohw", w, diff)

    offsets = [(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)]
    y = 0
    if kind == "cv":
        for dr, dc in offsets:
            y = y + weighted(tap(weight, dr, dc), shifted(x, dr, dc))
    elif kind == "cd":  # each neighbour minus the centre
        for dr, dc in offsets:
            y = y + weighted(tap(weight, dr, dc), shifted(x, dr, dc) - x)
    elif kind == "ad":  # each ring pixel minus its clockwise neighbour
        for dr, dc in offsets:
            nr, nc = CLOCKWISE_NEXT[(dr, dc)]
            y = y + weighted(tap(weight, dr, dc), shifted(x, dr, dc) - shifted(x, nr, nc))
    elif kind == "rd":  # outer ring minus inner ring along 8 rays; weights 1..8 in row-major order
        flat = weight.flatten(2)
        for k, (dr, dc) in enumerate(DIRECTIONS, start=1):
            y = y + weighted(flat[:, :, k], shifted(x, 2 * dr, 2 * dc) - shifted(x, dr, dc))
    return y


@pytest.mark.parametrize("kind", ["cv", "cd", "ad", "rd"])
def test_pixel_difference_conv_matches_its_definition(kind):
    torch.manual_seed(0)
    conv = PixelDifferenceConv2d(kind, 3, 5, padding=1)
    x = torch.randn(2, 3, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), reference_pdc(x, conv.weight, kind), atol=1e-5, rtol=1e-5)


def test_depthwise_pixel_difference_conv_acts_per_channel():
    torch.manual_seed(0)
    conv = PixelDifferenceConv2d("ad", 4, 4, padding=1, groups=4)
    x = torch.randn(1, 4, 7, 7)
    with torch.no_grad():
        y = conv(x)
        for c in range(4):
            torch.testing.assert_close(y[:, c:c + 1], reference_pdc(x[:, c:c + 1], conv.weight[c:c + 1], "ad"))


# -------------------------------------------------------------------------- PIDINet
def test_pidinet_loads_plain_and_dataparallel_wrapped_state_dicts_alike(tmp_path):
    raw = torch.load(PIDINET_CKPT, map_location="cpu", weights_only=True)
    assert "state_dict" in raw and next(iter(raw["state_dict"])).startswith("module.")
    plain = tmp_path / "plain.pth"
    torch.save({k.removeprefix("module."): v for k, v in raw["state_dict"].items()}, plain)
    views = random_views(1, 256)
    a = load_pidinet(CheckpointConfig(path=str(PIDINET_CKPT)), PrecomputeConfig(), CPU)
    b = load_pidinet(CheckpointConfig(path=str(plain), variant="baseline"), PrecomputeConfig(), CPU)
    out = a.compute(views)
    assert_targets_fit_spec(a, out, 1)
    np.testing.assert_array_equal(out["edges"], b.compute(views)["edges"])


def test_pidinet_unknown_configuration_is_an_error_naming_the_config_key():
    with pytest.raises(ValueError, match="precompute.checkpoints.pidinet.variant"):
        load_pidinet(CheckpointConfig(path=str(PIDINET_CKPT), variant="carv5"), PrecomputeConfig(), CPU)


def test_pidinet_stage1_export_round_trips_with_dynamic_batch(tmp_path):
    anchor = load_pidinet(CheckpointConfig(path=str(PIDINET_CKPT)), PrecomputeConfig(), CPU)
    files = anchor.export_decoders(tmp_path / "decoders")
    assert files == ["pidinet_stage1.pt2", "pidinet_stage1.json"]
    meta = json.loads((tmp_path / "decoders" / "pidinet_stage1.json").read_text())
    assert meta["input_size"] == 256 and meta["channels"] == 60
    assert meta["mean"] == [0.485, 0.456, 0.406] and meta["std"] == [0.229, 0.224, 0.225]
    exported = torch.export.load(tmp_path / "decoders" / "pidinet_stage1.pt2").module()
    torch.manual_seed(0)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 256, 256)
        with torch.no_grad():
            live = anchor.net.stage1(x)
            assert live.shape == (batch, 60, 256, 256)
            torch.testing.assert_close(exported(x), live, atol=1e-5, rtol=1e-5)


def test_pidinet_other_configurations_build_from_the_same_weights():
    sd = read_checkpoint(PIDINET_CKPT)
    net = build_pidinet(sd, PIDINET_CKPT, "carv4")
    kinds = [net.init_block.kind] + [getattr(net, f"block{s}_{b}").conv1.kind
                                     for s, n in zip((1, 2, 3, 4), (3, 4, 4, 4)) for b in range(1, n + 1)]
    assert kinds == ["cd", "ad", "rd", "cv"] * 4


def test_pidinet_input_size_sets_its_view_edges_and_exported_stage(tmp_path):
    anchor = load_pidinet(CheckpointConfig(path=str(PIDINET_CKPT), input_size=56), PrecomputeConfig(), CPU)
    assert anchor.dims() == {"map_h": 56, "map_w": 56} and anchor.fingerprint()["input_size"] == 56
    assert anchor.compute(random_views(2, 56))["edges"].shape == (2, 56, 56)
    anchor.export_decoders(tmp_path)
    assert json.loads((tmp_path / "pidinet_stage1.json").read_text())["input_size"] == 56
    pre = PrecomputeConfig(checkpoints={"dino": CheckpointConfig(path="x.pth", input_size=56)})
    with pytest.raises(ValueError, match="precompute.checkpoints.dino.input_size"):
        load_anchor("dino", pre, CPU)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="page-locked copies from a GPU: needs a CUDA device"))])
def test_targets_reach_the_host_as_numpy_with_their_values(device):
    """``to_host``: every anchor's targets (float, bool, int32; a non-contiguous view too) as numpy arrays of the same
    values; from a GPU through page-locked buffers."""
    from precompute.anchors.base import to_host

    torch.manual_seed(0)
    targets = {"features": torch.randn(2, 3, 5, device=device).transpose(1, 2),
               "masks": torch.rand(2, 4, 4, device=device) > 0.5,
               "count": torch.tensor([3, 1], dtype=torch.int32, device=device)}
    got = to_host(targets)
    for name, t in targets.items():
        assert isinstance(got[name], np.ndarray) and got[name].dtype == t.cpu().numpy().dtype
        np.testing.assert_array_equal(got[name], t.cpu().numpy())
