"""Our anchor heads and losses against CoVT's reference functions (tests/golden/covt_heads).

The golden file holds, per anchor, head weights made by the reference's modules, thought
hidden states, targets, every intermediate value and the loss, computed in fp32 by
make_golden.py (tests/golden/README.md) with the reference's own functions. We load those
weights into OUR heads (every size read from the golden's arrays), feed the same inputs and compare
each stored value within 1e-5. ``COVT_HEADS_GOLDEN=/path/file.npz`` runs the same checks
on another file of the same schema (other sizes, other seeds).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

from precompute.anchors.pidinet import CONFIGS, PiDiNet, PidinetAnchor
from trainer.heads import CacheDims, build_heads
from trainer.heads.sam import rotary_embedding, sam_token_loss

DEFAULT_GOLDEN = Path(__file__).resolve().parent / "golden" / "covt_heads" / "reference_heads_golden.npz"
GOLDEN = Path(os.environ.get("COVT_HEADS_GOLDEN") or DEFAULT_GOLDEN)
TOLERANCE = dict(atol=1e-5, rtol=1e-5)

pytestmark = pytest.mark.skipif(
    not GOLDEN.is_file(), reason=f"reference heads golden not found at {GOLDEN} (COVT_HEADS_GOLDEN names another)")


def reference_state_dict(golden, anchor: str) -> dict[str, torch.Tensor]:
    """The golden's weights for ``anchor`` under our parameter names.

    make_golden.py names them after its modules, which stand for the reference model's:
    ``{anchor}.projection.*`` = ``{anchor}_projection`` -> ``attend.thought_projection.*``,
    ``{anchor}.attn.*`` = ``{anchor}_cross_attention`` (nn.MultiheadAttention, whose names
    ours keeps) -> ``attend.cross_attention.*``, ``{anchor}.query`` = ``{anchor}_query_vectors``
    -> ``attend.query_vectors``, ``depth.generator.*`` = ``depth_token_generator.*`` (same name).
    """
    prefixes = {"projection.": "attend.thought_projection.", "attn.": "attend.cross_attention.",
                "generator.": "depth_token_generator."}
    state = {}
    for key in golden.files:
        if not key.startswith(f"{anchor}."):
            continue
        name = key[len(anchor) + 1:]
        if name == "query":
            state["attend.query_vectors"] = torch.from_numpy(golden[key])
        for old, new in prefixes.items():
            if name.startswith(old):
                state[new + name[len(old):]] = torch.from_numpy(golden[key])
    return state


def tensor(golden, key: str) -> torch.Tensor:
    return torch.from_numpy(np.asarray(golden[key], dtype=np.float32))


def assert_close(actual: torch.Tensor, golden, key: str) -> None:
    expected = tensor(golden, key)
    assert tuple(actual.shape) == tuple(expected.shape), (key, tuple(actual.shape), tuple(expected.shape))
    torch.testing.assert_close(actual.detach().float(), expected, **TOLERANCE, msg=lambda m: f"{key}: {m}")


# ------------------------------------------------------------ heads sized from the golden
def write_sam_decoder(path: Path, prompt_dim: int, embed_hw: int) -> None:
    """A random SAM prompt encoder + mask decoder in precompute's file format (the golden
    stops at the prompts and the loss, so only its prompt width matters)."""
    torch.manual_seed(0)
    arch = {"prompt_embed_dim": prompt_dim, "image_embedding_size": (embed_hw, embed_hw),
            "input_image_size": (16 * embed_hw, 16 * embed_hw), "mask_in_chans": 4,
            "transformer": {"depth": 1, "embedding_dim": prompt_dim, "mlp_dim": 16, "num_heads": 2},
            "num_multimask_outputs": 3, "iou_head_depth": 2, "iou_head_hidden_dim": 16}
    encoder = PromptEncoder(embed_dim=prompt_dim, image_embedding_size=arch["image_embedding_size"],
                            input_image_size=arch["input_image_size"], mask_in_chans=4)
    decoder = MaskDecoder(transformer_dim=prompt_dim, num_multimask_outputs=3, iou_head_depth=2, iou_head_hidden_dim=16,
                          transformer=TwoWayTransformer(depth=1, embedding_dim=prompt_dim, mlp_dim=16, num_heads=2))
    torch.save({**arch, "prompt_encoder": encoder.state_dict(), "mask_decoder": decoder.state_dict()}, path)


def write_pidinet_stage1(folder: Path, channels: int, size: int) -> None:
    """A random PIDINet of ``channels`` width whose stage 1 precompute exports (the golden gives x1 itself)."""
    torch.manual_seed(0)
    net = PiDiNet(CONFIGS["baseline"], width=channels, dil=None, sa=False)
    torch.save(net.state_dict(), folder / "pidinet.pth")
    anchor = PidinetAnchor(net, "baseline", str(folder / "pidinet.pth"))
    anchor.input_size = size
    anchor.export_decoders(folder)


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN)


@pytest.fixture(scope="module")
def heads(golden, tmp_path_factory):
    g = golden
    masks_side = g["sam.pred_logits"].shape[-1]
    prompt_dim = g["sam.query"].shape[1]
    depth_layers, patches, depth_dim = g["depth.features"].shape
    dims = {
        "sam": {"embed_dim": prompt_dim, "embed_h": masks_side // 4, "embed_w": masks_side // 4,
                "max_masks": max(g["sam.gt_masks_" + n].shape[0] for n in sam_mask_counts(g)),
                "mask_h": masks_side, "mask_w": masks_side},
        "depth": {"layers": depth_layers, "patches": patches, "dim": depth_dim,
                  "map_h": g["depth.target"].shape[-2], "map_w": g["depth.target"].shape[-1]},
        "dino": {"tokens": g["dino.query"].shape[0], "dim": g["dino.query"].shape[1]},
        "pidinet": {"map_h": g["pidinet.e1_logits"].shape[-2], "map_w": g["pidinet.e1_logits"].shape[-1]},
        "siglip": {"dim": g["siglip.query"].shape[1]},
        "metaclip": {"dim": g["metaclip.query"].shape[1]},
    }
    decoders = tmp_path_factory.mktemp("reference_decoders")
    write_sam_decoder(decoders / "sam_decoder.pt", prompt_dim, masks_side // 4)
    write_pidinet_stage1(decoders, g["pidinet.x1"].shape[1], g["pidinet.x1"].shape[-1])
    built = build_heads(list(dims), g["sam.hidden"].shape[-1], CacheDims(dims, decoders))
    for anchor, head in built.items():
        head.load_state_dict(reference_state_dict(g, anchor), strict=True)  # strict: every weight is the golden's
    return built.eval()


def sam_mask_counts(golden) -> list[str]:
    return sorted((k[len("sam.loss_"):] for k in golden.files if k.startswith("sam.loss_")), key=int)


def sam_targets(golden, counts: list[str], max_masks: int) -> dict[str, torch.Tensor]:
    """The golden's reference masks of each case, padded to the cache's ``max_masks`` like cached ones."""
    side = golden["sam.pred_logits"].shape[-1]
    masks = torch.zeros(len(counts), max_masks, side, side, dtype=torch.bool)
    for i, n in enumerate(counts):
        gt = tensor(golden, f"sam.gt_masks_{n}")
        masks[i, :gt.shape[0]] = gt > 0.5
    return {"masks": masks, "mask_count": torch.tensor([int(n) for n in counts])}


# ------------------------------------------------------------ sam
def test_sam_rotary_embedding_and_prompts_match_reference(heads, golden):
    hidden = tensor(golden, "sam.hidden")
    assert_close(rotary_embedding(hidden), golden, "sam.after_rope")
    with torch.no_grad():
        assert_close(heads["sam"].prompts(hidden), golden, "sam.prompt_tokens")


def test_sam_loss_matches_reference_for_each_mask_count(heads, golden):
    predicted = tensor(golden, "sam.pred_logits")[None]
    for n in sam_mask_counts(golden):
        targets = sam_targets(golden, [n], heads["sam"].dims["max_masks"])
        assert_close(heads["sam"].loss(predicted, targets), golden, f"sam.loss_{n}")


def test_sam_loss_of_a_batch_is_the_mean_of_the_images_losses(heads, golden):
    counts = sam_mask_counts(golden)
    predicted = tensor(golden, "sam.pred_logits")[None].expand(len(counts), -1, -1, -1)
    targets = sam_targets(golden, counts, heads["sam"].dims["max_masks"])
    loss = sam_token_loss(predicted, targets["masks"], targets["mask_count"])
    expected = np.mean([float(golden[f"sam.loss_{n}"]) for n in counts])
    assert loss.item() == pytest.approx(expected, abs=1e-5)


# ------------------------------------------------------------ depth
def test_depth_prediction_and_loss_match_reference(heads, golden):
    thoughts = tensor(golden, "depth.hidden")[None]  # the reference feeds one image's (tokens, hidden)
    targets = {"features": tensor(golden, "depth.features")[None], "depth": tensor(golden, "depth.target")[:, 0]}
    with torch.no_grad():
        assert_close(heads["depth"].decode(thoughts, targets)[:, None], golden, "depth.pred")
        assert_close(heads["depth"](thoughts, targets), golden, "depth.loss")


# ------------------------------------------------------------ dino, siglip, metaclip
def test_dino_prediction_and_loss_match_reference(heads, golden):
    thoughts, targets = tensor(golden, "dino.hidden"), {"features": tensor(golden, "dino.target")}
    with torch.no_grad():
        assert_close(heads["dino"].decode(thoughts), golden, "dino.pred")
        assert_close(heads["dino"](thoughts, targets), golden, "dino.loss")


@pytest.mark.parametrize("anchor", ["siglip", "metaclip"])
def test_pooled_embedding_prediction_and_loss_match_reference(heads, golden, anchor):
    thoughts, targets = tensor(golden, f"{anchor}.hidden"), {"embedding": tensor(golden, f"{anchor}.target")}
    with torch.no_grad():
        assert_close(heads[anchor].decode(thoughts)[:, None], golden, f"{anchor}.pred")
        assert_close(heads[anchor](thoughts, targets), golden, f"{anchor}.loss")


def test_pooled_embedding_loss_is_per_sample_not_the_references_cross_batch_broadcast(heads, golden):
    # the reference compares (B, 1, dim) with (B, dim): every prediction against every target
    thoughts = tensor(golden, "siglip.hidden").expand(2, -1, -1)
    target = tensor(golden, "siglip.target")
    with torch.no_grad():
        prediction = heads["siglip"].decode(thoughts)
        loss = heads["siglip"](thoughts, {"embedding": torch.cat([target, -target])})
    expected = (float(golden["siglip.loss"]) + 5 * torch.mean((prediction[1] + target[0]) ** 2).item()) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------ pidinet
def test_pidinet_edges_and_loss_match_reference(heads, golden):
    thoughts, x1 = tensor(golden, "pidinet.hidden"), tensor(golden, "pidinet.x1")
    edges = {"edges": torch.sigmoid(tensor(golden, "pidinet.e1_logits"))[:, 0]}  # the cached target: sigmoid(side 1)
    with torch.no_grad():
        prediction = heads["pidinet"].edges_from_features(thoughts, x1)
        assert_close(prediction[:, None], golden, "pidinet.pred")
        assert_close(heads["pidinet"].loss(prediction, edges), golden, "pidinet.loss")
