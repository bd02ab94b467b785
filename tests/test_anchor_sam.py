"""SAM anchor: targets fit the registry, automatic masks agree with segment_anything's, decoders export."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamAutomaticMaskGenerator
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

from covt.anchors import SAM_DECODER_FILE, array_shape, get_anchor
from covt.config import load_config
from covt.images import square_view
from precompute.anchors import load_anchor
from precompute.anchors.base import MissingCheckpointError
from precompute.anchors.sam import SamAnchor, build_sam_vit_tiny, select_masks

PHOTOS = sorted((Path(__file__).resolve().parents[1] / "data/sample/images").glob("*.jpg"))


def tiny_sam(tmp_path: Path, *overrides: str) -> SamAnchor:
    cfg = load_config("configs/tiny.yaml", [f"precompute.checkpoints.sam.path={tmp_path}/sam_vit_tiny.pth", *overrides])
    return load_anchor("sam", cfg.precompute, torch.device("cpu"))


def views(anchor, n: int) -> torch.Tensor:
    return torch.from_numpy(np.stack([square_view(Image.open(p), anchor.input_size) for p in PHOTOS[:n]]))


@pytest.fixture(scope="module")
def sam_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sam")


def test_compute_returns_arrays_of_the_registry_shapes(sam_dir):
    # thresholds low enough that the random tiny model proposes masks
    anchor = tiny_sam(sam_dir, "precompute.sam.pred_iou_thresh=0.1", "precompute.sam.stability_score_thresh=0.0")
    out = anchor.compute(views(anchor, 3))
    dims = anchor.dims()
    assert dims["mask_h"] == 4 * dims["embed_h"] and dims["max_masks"] == 8
    kinds = {"float": np.float32, "mask": np.bool_, "count": np.int32}
    for spec in get_anchor("sam").arrays:
        assert out[spec.name].shape == (3, *array_shape("sam", spec.name, dims)), spec.name
        assert out[spec.name].dtype == kinds[spec.kind], spec.name
    counts = out["mask_count"]
    assert ((counts >= 1) & (counts <= 8)).all()
    for i, c in enumerate(counts):
        assert out["masks"][i, :c].reshape(c, -1).any(1).all(), "a counted mask is empty"
        assert not out["masks"][i, c:].any(), "padding rows must be all false"


def test_random_checkpoint_is_a_plain_sam_state_dict(sam_dir):
    tiny_sam(sam_dir)
    path = sam_dir / "sam_vit_tiny.pth"
    state = torch.load(path, weights_only=True)
    assert {k.split(".")[0] for k in state} == {"image_encoder", "prompt_encoder", "mask_decoder"}
    rebuilt = build_sam_vit_tiny(str(path))  # segment_anything's own classes load it
    assert torch.equal(rebuilt.mask_decoder.iou_token.weight, state["mask_decoder.iou_token.weight"])


def test_candidates_match_segment_anything_automatic_mask_generator(sam_dir):
    anchor = tiny_sam(sam_dir, "precompute.sam.pred_iou_thresh=0.15", "precompute.sam.stability_score_thresh=0.0",
                      "precompute.sam.point_batch_size=50")
    v = views(anchor, 2)
    cand = anchor.mask_candidates(anchor.embed(v))
    generator = SamAutomaticMaskGenerator(anchor.sam, points_per_side=anchor.amg.points_per_side,
                                          pred_iou_thresh=0.15, stability_score_thresh=0.0, box_nms_thresh=1.0)
    for i in range(2):
        theirs = sorted((*m["point_coords"][0], round(m["predicted_iou"], 4))
                        for m in generator.generate(v[i].numpy()) if m["area"] > 0)
        mine = cand["image"] == i
        ours = sorted((*anchor.grid_points[p].tolist(), round(q, 4))
                      for p, q in zip(cand["point"][mine].tolist(), cand["iou"][mine].tolist()))
        assert len(theirs) > 10
        assert len(ours) == len(theirs)
        np.testing.assert_allclose(np.array(ours), np.array(theirs), atol=2e-4)


def test_decoding_many_images_per_call_equals_mask_decoder_forward(sam_dir):
    anchor = tiny_sam(sam_dir, "precompute.sam.pred_iou_thresh=0.1", "precompute.sam.stability_score_thresh=0.0",
                      "precompute.sam.point_batch_size=40")
    emb = anchor.embed(views(anchor, 3))
    batched = anchor.mask_candidates(emb)
    anchor.decode_mode = "per_image"
    per_image = anchor.mask_candidates(emb)
    for key in ("image", "point"):
        assert torch.equal(batched[key], per_image[key])
    torch.testing.assert_close(batched["iou"], per_image["iou"], atol=1e-5, rtol=1e-5)
    assert (batched["masks"] != per_image["masks"]).float().mean() < 1e-3


def rectangle(h, w, y0, x0, y1, x1):
    m = torch.zeros(h, w, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


def test_selection_suppresses_overlapping_boxes_and_ranks_by_score():
    from precompute.anchors.sam import mask_boxes

    # image 0: two near-duplicates (IoU 0.9) and a disjoint mask; image 1: ten disjoint masks
    masks = [rectangle(40, 40, 0, 0, 10, 10), rectangle(40, 40, 0, 0, 10, 9), rectangle(40, 40, 20, 20, 30, 30)]
    masks += [rectangle(40, 40, 4 * k, 0, 4 * k + 3, 5) for k in range(10)]
    score = torch.tensor([0.5, 0.9, 0.7] + [0.1 * k for k in range(10)])
    cand = {
        "masks": torch.stack(masks), "score": score, "iou": score.sqrt(), "stability": score.sqrt(),
        "image": torch.tensor([0] * 3 + [1] * 10), "point": torch.arange(13),
    }
    cand["boxes"] = mask_boxes(cand["masks"])
    assert cand["boxes"][0].tolist() == [0, 0, 10, 10]
    grid = torch.arange(26, dtype=torch.float32).view(13, 2)
    out = select_masks(cand, 2, grid, max_masks=8, nms_thresh=0.7)
    assert out.count.tolist() == [2, 8]
    assert torch.equal(out.masks[0, 0], masks[1]) and torch.equal(out.masks[0, 1], masks[2])
    assert not out.masks[0, 2:].any()
    # image 1 keeps its 8 best (scores 0.9 .. 0.2), best first
    torch.testing.assert_close(out.iou[1] ** 2, torch.tensor([0.1 * k for k in range(9, 1, -1)]))
    assert torch.equal(out.points[1, 0], grid[12])


def rebuild_sam_decoders(path: Path) -> tuple[PromptEncoder, MaskDecoder]:
    """What the trainer does: segment_anything's PromptEncoder + MaskDecoder from the exported file alone."""
    d = torch.load(path, weights_only=True)
    t = d["transformer"]
    prompt_encoder = PromptEncoder(embed_dim=d["prompt_embed_dim"],
                                   image_embedding_size=tuple(d["image_embedding_size"]),
                                   input_image_size=tuple(d["input_image_size"]), mask_in_chans=d["mask_in_chans"])
    mask_decoder = MaskDecoder(
        transformer_dim=d["prompt_embed_dim"],
        transformer=TwoWayTransformer(depth=t["depth"], embedding_dim=t["embedding_dim"], mlp_dim=t["mlp_dim"],
                                      num_heads=t["num_heads"]),
        num_multimask_outputs=d["num_multimask_outputs"], iou_head_depth=d["iou_head_depth"],
        iou_head_hidden_dim=d["iou_head_hidden_dim"],
    )
    prompt_encoder.load_state_dict(d["prompt_encoder"])
    mask_decoder.load_state_dict(d["mask_decoder"])
    return prompt_encoder.eval(), mask_decoder.eval()


def test_exported_decoders_rebuild_without_a_sam_checkpoint(sam_dir, tmp_path):
    anchor = tiny_sam(sam_dir)
    assert anchor.export_decoders(tmp_path) == [SAM_DECODER_FILE]
    prompt_encoder, mask_decoder = rebuild_sam_decoders(tmp_path / SAM_DECODER_FILE)
    emb = anchor.embed(views(anchor, 1))
    prompts = torch.randn(5, 3, anchor.sam.prompt_encoder.embed_dim)  # e.g. projected thought tokens
    with torch.no_grad():
        dense = prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        ref_dense = anchor.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1)
        ours = mask_decoder(emb, prompt_encoder.get_dense_pe(), prompts, dense, multimask_output=False)
        ref = anchor.sam.mask_decoder(emb, anchor.sam.prompt_encoder.get_dense_pe(), prompts, ref_dense,
                                      multimask_output=False)
    for a, b in zip(ours, ref):
        assert torch.equal(a, b)


def test_missing_checkpoint_names_file_key_and_download(tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"precompute.checkpoints.sam.path={tmp_path}/sam_vit_h_4b8939.pth",
                                             "precompute.checkpoints.sam.variant=vit_h",
                                             "precompute.checkpoints.sam.random_init_seed=null"])
    with pytest.raises(MissingCheckpointError) as e:
        load_anchor("sam", cfg.precompute, torch.device("cpu"))
    msg = str(e.value)
    assert "sam_vit_h_4b8939.pth" in msg and "precompute.checkpoints.sam.path" in msg
    assert "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth" in msg


# ------------------------------------------------------------ fast encoder attention (sam_fast.py)
@pytest.mark.parametrize("mode", ["sdpa_bias", "sdpa_fold"])
@pytest.mark.parametrize("use_rel_pos", [True, False])
@pytest.mark.parametrize("dim,heads,table_side,side", [
    (32, 2, 8, 8),  # a window of the tiny encoder
    (32, 2, 16, 16),  # its global block
    (40, 2, 7, 7),  # head dim 20: the folded keys get zero padding
    (48, 3, 14, 14),  # vit_h's window side (a mask row needs alignment padding)
    (32, 2, 8, 6),  # rel-pos tables interpolated to another side
])
def test_sdpa_attention_equals_segment_anything_attention(mode, use_rel_pos, dim, heads, table_side, side):
    from segment_anything.modeling.image_encoder import Attention

    from precompute.anchors.sam_fast import FORWARDS

    torch.manual_seed(0)
    attn = Attention(dim, num_heads=heads, use_rel_pos=use_rel_pos, rel_pos_zero_init=False,
                     input_size=(table_side, table_side))
    if use_rel_pos:
        torch.nn.init.normal_(attn.rel_pos_h)
        torch.nn.init.normal_(attn.rel_pos_w)
    x = torch.randn(3, side, side, dim)
    with torch.no_grad():
        ref = attn(x)
        fast = FORWARDS[mode](attn, x)
    assert fast.shape == ref.shape
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
    if use_rel_pos:  # the rel-pos terms matter at this scale, so the comparison is not vacuous
        attn.use_rel_pos = False
        with torch.no_grad():
            assert (attn(x) - ref).abs().max() > 1e-2


def test_fast_attention_keeps_the_tiny_encoder_output_and_state_dict(sam_dir):
    from segment_anything.modeling.image_encoder import Attention

    anchor = tiny_sam(sam_dir)
    torch.manual_seed(1)
    for m in anchor.sam.image_encoder.modules():  # released checkpoints have non-zero rel-pos tables
        if isinstance(m, Attention):
            torch.nn.init.normal_(m.rel_pos_h, std=0.5)
            torch.nn.init.normal_(m.rel_pos_w, std=0.5)
    keys = list(anchor.sam.state_dict())
    v = views(anchor, 2)
    anchor.encoder_attention = "library"
    ref = anchor.embed(v)
    for mode in ("sdpa_bias", "sdpa_fold"):
        anchor.encoder_attention = mode
        assert anchor.encoder_attention == mode
        assert list(anchor.sam.state_dict()) == keys
        torch.testing.assert_close(anchor.embed(v), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="sdpa_bias"):
        anchor.encoder_attention = "flash"


@pytest.mark.parametrize("mode", ["library", "sdpa_bias", "sdpa_fold"])
@pytest.mark.parametrize("side,window", [(16, 6), (14, 14), (10, 4)])  # padded by 2 / none / by 2
def test_unpadded_windows_equal_segment_anything_block(mode, side, window):
    """A windowed Block with no projection of the window padding: the library's output, in every attention mode;
    and the padding matters (projecting zeros instead of the bias changes the border windows)."""
    from segment_anything.modeling.image_encoder import Block

    from precompute.anchors.sam_fast import padded_projection, unpadded_window_block_forward, use_encoder_attention

    torch.manual_seed(0)
    block = Block(32, num_heads=2, use_rel_pos=True, rel_pos_zero_init=False, window_size=window,
                  input_size=(window, window))
    torch.nn.init.normal_(block.attn.rel_pos_h)
    torch.nn.init.normal_(block.attn.rel_pos_w)
    torch.nn.init.normal_(block.attn.qkv.bias)
    encoder = torch.nn.Sequential(block)
    use_encoder_attention(encoder, mode)
    x = torch.randn(2, side, side, 32)
    with torch.no_grad():
        ref = block(x)
        fast = unpadded_window_block_forward(block, x)
        torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-5)
        if side % window:
            qkv = padded_projection(block.attn.qkv, block.norm1(x), window)
            assert torch.equal(qkv[:, side:, :], block.attn.qkv.bias.expand_as(qkv[:, side:, :]))
            block.attn.qkv.bias.zero_()  # the bias is what the padded keys and values carry
            assert (unpadded_window_block_forward(block, x) - ref).abs().max() > 1e-3


def test_unpadded_windows_switch_keeps_the_tiny_encoder_output(sam_dir):
    anchor = tiny_sam(sam_dir)
    assert anchor.unpadded_windows is False
    assert tiny_sam(sam_dir, "precompute.sam.unpadded_windows=true").unpadded_windows is True
    keys = list(anchor.sam.state_dict())
    v = views(anchor, 2)
    ref = anchor.embed(v)
    anchor.unpadded_windows = True
    assert list(anchor.sam.state_dict()) == keys
    torch.testing.assert_close(anchor.embed(v), ref, atol=1e-5, rtol=1e-5)
    anchor.unpadded_windows = False
    assert anchor.unpadded_windows is False


# ------------------------------------------------------------ fast mask decoding (sam_fast.py)
def spread_decoder_weights(anchor: SamAnchor, seed: int) -> None:
    """Larger random decoder weights than the init: logits beyond the +-1 stability offsets, IoUs around 0.5."""
    torch.manual_seed(seed)
    for p in anchor.sam.mask_decoder.parameters():
        p.data.normal_(0, 0.3)
    anchor.sam.mask_decoder.iou_prediction_head.layers[-1].bias.data += 1.0


@pytest.mark.parametrize("how", ["library", "sdpa", "folded"])
def test_batched_decoding_equals_mask_decoder_forward_per_prompt(sam_dir, how):
    from precompute.anchors.sam_fast import decode_outputs, multimask_logits

    anchor = tiny_sam(sam_dir)
    spread_decoder_weights(anchor, 2)
    sam = anchor.sam
    emb = torch.randn(3, *sam.image_encoder.neck[-1].weight.shape[:1], *sam.prompt_encoder.image_embedding_size)
    img = torch.tensor([0, 0, 2, 1, 1, 2, 0])  # consecutive runs and an image seen twice
    pts = torch.rand(len(img), 1, 2) * anchor.input_size
    sparse, _ = sam.prompt_encoder(points=(pts, torch.ones(len(img), 1, dtype=torch.int)), boxes=None, masks=None)
    with torch.no_grad():
        mask_tokens, keys, iou = decode_outputs(sam, emb, img, sparse, how)
        logits = multimask_logits(sam, keys, mask_tokens)
        for j, i in enumerate(img.tolist()):
            ref_logits, ref_iou = sam.mask_decoder(
                image_embeddings=emb[i:i + 1], image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse[j:j + 1],
                dense_prompt_embeddings=sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1),
                multimask_output=True)
            assert ref_logits.max() > 0.1 and ref_logits.min() < -0.1  # masks with inside and outside
            torch.testing.assert_close(logits[j:j + 1], ref_logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(iou[j:j + 1], ref_iou, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("how", ["library", "folded"])
def test_decoder_tokens_kept_in_bf16_round_the_tokens_only(sam_dir, how):
    """precompute.sam.decoder_tokens_bf16: under bf16 autocast (CPU's here) the per-prompt image tokens leave each
    layer in bf16 instead of the LayerNorm's float32; the outputs stay within bf16 rounding of the fp32 decoding,
    as close as autocast's own, and the anchor asks for it only where its decoder runs in bf16 on a GPU."""
    from precompute.anchors.sam import decoder_tokens_dtype
    from precompute.anchors.sam_fast import decode_outputs

    anchor = tiny_sam(sam_dir)
    spread_decoder_weights(anchor, 4)
    sam = anchor.sam
    emb = torch.randn(2, *sam.image_encoder.neck[-1].weight.shape[:1], *sam.prompt_encoder.image_embedding_size)
    img = torch.tensor([0, 0, 1, 1, 0])
    pts = torch.rand(len(img), 1, 2) * anchor.input_size
    sparse, _ = sam.prompt_encoder(points=(pts, torch.ones(len(img), 1, dtype=torch.int)), boxes=None, masks=None)
    with torch.no_grad():
        ref = decode_outputs(sam, emb, img, sparse, how)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = decode_outputs(sam, emb, img, sparse, how)
            kept = decode_outputs(sam, emb, img, sparse, how, tokens_dtype=torch.bfloat16)
    assert autocast[1].dtype == torch.float32 and kept[1].dtype == torch.bfloat16
    for name, r, a, k in zip(("mask tokens", "keys", "iou"), ref, autocast, kept, strict=True):
        err_autocast = ((a.float() - r).norm() / r.norm()).item()
        err_kept = ((k.float() - r).norm() / r.norm()).item()
        assert 0 < err_kept < max(2 * err_autocast, 1e-2), (name, err_kept, err_autocast)
    assert decoder_tokens_dtype(True, True, on_gpu=True) == torch.bfloat16
    assert decoder_tokens_dtype(True, False, on_gpu=True) is None  # the switch off
    assert decoder_tokens_dtype(False, True, on_gpu=True) is None  # an fp32 decoder
    assert decoder_tokens_dtype(True, True, on_gpu=False) is None  # the CPU decodes in fp32


def assert_same_candidates(a: dict, b: dict, a_masks, b_masks) -> None:
    """Two ways of making the candidates agree: the same prompts, IoUs and stabilities within 1e-5 (fp32), at
    most 2 flipped mask pixels (a logit within rounding of 0), and the same selected masks' counts and points."""
    for key in ("image", "point"):
        assert torch.equal(a[key], b[key]), key
    torch.testing.assert_close(a["iou"], b["iou"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a["stability"], b["stability"], atol=1e-5, rtol=1e-5)
    assert (a["masks"] != b["masks"]).sum() <= 2
    assert torch.equal(a_masks.count, b_masks.count) and torch.equal(a_masks.points, b_masks.points)


def test_fast_decoding_keeps_candidates_and_selected_masks(sam_dir):
    anchor = tiny_sam(sam_dir, "precompute.sam.pred_iou_thresh=0.4", "precompute.sam.stability_score_thresh=0.42",
                      "precompute.sam.point_batch_size=24")  # chunks that split images
    spread_decoder_weights(anchor, 3)
    emb = anchor.embed(views(anchor, 3))
    fast = anchor.mask_candidates(emb)
    anchor.decode_mode = "per_image"  # MaskDecoder.forward, segment_anything's own code
    ref = anchor.mask_candidates(emb)
    n_all = 3 * len(anchor.grid_points) * 3
    assert 50 < len(ref["iou"]) < n_all // 3  # both thresholds bite
    ref_masks = anchor.automatic_masks(emb)
    anchor.decode_mode = "batched"
    assert_same_candidates(fast, ref, anchor.automatic_masks(emb), ref_masks)


def test_folded_decoder_attention_keeps_candidates_and_selected_masks(sam_dir):
    """precompute.sam.decoder_attention=folded (the image side's projections moved onto the prompt tokens' side)
    computes segment_anything's attention: the same candidates and selected masks as the library's maths."""
    anchor = tiny_sam(sam_dir, "precompute.sam.pred_iou_thresh=0.4", "precompute.sam.stability_score_thresh=0.42",
                      "precompute.sam.point_batch_size=24", "precompute.sam.decoder_attention=folded")
    spread_decoder_weights(anchor, 3)
    emb = anchor.embed(views(anchor, 3))
    folded, folded_masks = anchor.mask_candidates(emb), anchor.automatic_masks(emb)
    anchor.decoder_attention = "library"
    library = anchor.mask_candidates(emb)
    assert len(library["iou"]) > 50
    assert_same_candidates(folded, library, folded_masks, anchor.automatic_masks(emb))


def test_masks_only_for_prompts_passing_the_iou_threshold_keep_every_candidate(sam_dir):
    """precompute.sam.iou_first: prompts whose predicted IoUs all fail pred_iou_thresh get no masks made; the
    candidates and the selected masks are those of making every prompt's masks."""
    from precompute.anchors.sam_fast import decode_outputs

    anchor = tiny_sam(sam_dir, "precompute.sam.pred_iou_thresh=0.46", "precompute.sam.stability_score_thresh=0.0",
                      "precompute.sam.point_batch_size=24")
    spread_decoder_weights(anchor, 3)
    anchor.sam.mask_decoder.iou_prediction_head.layers[-1].bias.data -= 1.4  # each prompt's best IoU 0.43-0.60
    emb = anchor.embed(views(anchor, 3))
    n_pts = len(anchor.grid_points)
    img = torch.arange(3).repeat_interleave(n_pts)
    with torch.no_grad():
        _, _, iou = decode_outputs(anchor.sam, emb, img, anchor.grid_sparse_embeddings().repeat(3, 1, 1))
    skipped = float((iou <= 0.46).all(1).float().mean())
    assert 0.2 < skipped < 0.8  # the threshold skips a real share of the prompts, and keeps some
    assert anchor.amg.iou_first  # the default
    masked_prompts = []  # prompts whose masks are made: rows through a hypernetwork of mask_logits
    anchor.sam.mask_decoder.output_hypernetworks_mlps[1].register_forward_hook(
        lambda module, args, out: masked_prompts.append(args[0].shape[0]))
    fast = anchor.mask_candidates(emb)
    made_fast = sum(masked_prompts)
    fast_masks = anchor.automatic_masks(emb)
    anchor.amg.iou_first = False
    masked_prompts.clear()
    every = anchor.mask_candidates(emb)
    assert sum(masked_prompts) == 3 * n_pts and made_fast == round(3 * n_pts * (1 - skipped))
    every_masks = anchor.automatic_masks(emb)
    assert len(every["iou"]) > 10
    assert_same_candidates(fast, every, fast_masks, every_masks)


def test_encoder_attention_comes_from_the_config(sam_dir):
    assert tiny_sam(sam_dir).encoder_attention == "sdpa_fold"
    assert tiny_sam(sam_dir, "precompute.sam.encoder_attention=library").encoder_attention == "library"
    with pytest.raises(Exception, match="encoder_attention"):
        tiny_sam(sam_dir, "precompute.sam.encoder_attention=flash")


def test_mask_kernel_comes_from_the_config(sam_dir):
    assert tiny_sam(sam_dir).mask_kernel == "auto"
    assert tiny_sam(sam_dir, "precompute.sam.mask_kernel=grouped").mask_kernel == "grouped"


def test_the_auto_mask_kernel_is_the_faster_form_for_the_tokens_and_a_gpu_refuses_the_one_that_crashed():
    """auto: grouped for bf16 tokens, per-sub-pixel for fp32 (the faster of the two in each on an H100); the
    per-sub-pixel kernel with bf16 tokens on a GPU is refused with the switch to use, as it stopped on illegal memory
    accesses there. The interpreter (not a GPU) runs either form."""
    from precompute.anchors.sam_masks import kernel_for

    assert kernel_for("auto", torch.bfloat16, True) == "grouped"
    assert kernel_for("auto", torch.float32, True) == "subpixels"
    assert kernel_for("grouped", torch.float32, True) == "grouped"
    assert kernel_for("subpixels", torch.float32, True) == "subpixels"
    assert kernel_for("subpixels", torch.bfloat16, False) == "subpixels"
    with pytest.raises(ValueError, match="mask_kernel=auto or grouped"):
        kernel_for("subpixels", torch.bfloat16, True)
    assert kernel_for("subpixels", torch.bfloat16, True, refuse=False) == "subpixels"  # bench_mask_kernel --unrefused
    with pytest.raises(ValueError, match="unknown mask kernel"):
        kernel_for("tiled", torch.float32, False)


def test_a_refused_mask_kernel_stops_the_sam_anchor_before_it_loads(sam_dir):
    """The config's refused combination (bf16 tokens, the per-sub-pixel kernel, a GPU) is an error when the anchor is
    loaded, before the weights and any batch: checked on the CPU, as the check needs no GPU."""
    from precompute.anchors import load_anchor

    overrides = ["precompute.dtype=bf16", "precompute.sam.fused_masks=true", "precompute.sam.mask_kernel=subpixels",
                 f"precompute.checkpoints.sam.path={sam_dir}/absent.pth"]
    cfg = load_config("configs/tiny.yaml", overrides)
    with pytest.raises(ValueError, match="mask_kernel=subpixels"):
        load_anchor("sam", cfg.precompute, torch.device("cuda"))
    assert tiny_sam(sam_dir, *overrides[:3]).fused_masks  # on the CPU the interpreter's path takes either kernel


@pytest.mark.slow  # inductor compiles C++ kernels on the CPU
def test_compiled_encoder_and_decoder_keep_the_embedding_candidates_and_selected_masks(sam_dir):
    """precompute.sam.compile_encoder / compile_decoder: the image encoder and the batched decoding through
    torch.compile give the eager embedding (fp32, within 1e-5) and candidates (IoUs and stabilities within 1e-5,
    at most 2 flipped mask pixels), and the same selected masks."""
    anchor = tiny_sam(sam_dir, "precompute.sam.pred_iou_thresh=0.4", "precompute.sam.stability_score_thresh=0.42",
                      "precompute.sam.point_batch_size=24", "precompute.sam.compile_decoder=true",
                      "precompute.sam.compile_encoder=true", "precompute.sam.decoder_attention=folded")
    spread_decoder_weights(anchor, 3)
    v = views(anchor, 3)
    with torch.profiler.profile() as profile:
        compiled_emb = anchor.embed(v)
    assert sum(e.count for e in profile.key_averages() if e.key.startswith("Torch-Compiled Region")) > 0
    with torch.compiler.set_stance("fail_on_recompile"):  # the second batch runs the first one's code
        torch.testing.assert_close(anchor.embed(v), compiled_emb, atol=0, rtol=0)
    anchor.compile_encoder = False
    emb = anchor.embed(v)
    torch.testing.assert_close(compiled_emb, emb, atol=1e-5, rtol=1e-5)
    assert anchor.compile_decoder
    with torch.profiler.profile() as profile:
        compiled = anchor.mask_candidates(emb)
    assert sum(e.count for e in profile.key_averages() if e.key.startswith("Torch-Compiled Region")) > 0
    compiled_masks = anchor.automatic_masks(emb)
    with torch.compiler.set_stance("fail_on_recompile"):
        assert torch.equal(anchor.mask_candidates(emb)["masks"], compiled["masks"])
    anchor.compile_decoder = False
    eager = anchor.mask_candidates(emb)
    eager_masks = anchor.automatic_masks(emb)
    assert len(eager["iou"]) > 50
    assert_same_candidates(compiled, eager, compiled_masks, eager_masks)


FUSED_MASKS_CHECK = """
import json, torch
from covt.config import SamPrecomputeConfig
from precompute.anchors.sam import BUILDERS, SamAnchor
from precompute.anchors.sam_fast import multimask_logits
from precompute.anchors.sam_masks import mask_statistics, statistics_of_logits

torch.manual_seed(0)
out = {}
# the real decoder's widths (256 tokens' channels, 64 and 32 after the upscalings), one prompt over 64 x 64 tokens
sam = BUILDERS["vit_b"](None).eval()
for p in sam.mask_decoder.parameters():
    p.data.normal_(0, 0.3)
keys, tokens = torch.randn(1, 64 * 64, 256), torch.randn(1, 3, 256)
with torch.no_grad():
    ref = statistics_of_logits(multimask_logits(sam, keys, tokens), 0.0, 1.0)
    got = mask_statistics(sam, keys, tokens, 0.0, 1.0)
    split = mask_statistics(sam, keys, tokens, 0.0, 1.0, launch={"SUBPIXELS": 1})  # a program per sub-pixel
    blocks = mask_statistics(sam, keys, tokens, 0.0, 1.0, launch={"BLOCK": 2048})  # 2 programs of 2,048 tokens
    grouped = [mask_statistics(sam, keys, tokens, 0.0, 1.0, launch=launch, kernel="grouped")  # 4 and 2 programs
               for launch in ({"BLOCK": 1024, "GROUP": 4}, {"BLOCK": 2048, "GROUP": 1})]
out["real_widths"] = {"flipped": int((ref.masks != got.masks).sum()), "pixels": ref.masks.numel(),
                      "counts": [[t.tolist() for t in (r.area, r.inner, r.outer)] for r in (ref, got)],
                      "split_same": [bool(torch.equal(other.masks, got.masks)) and all(
                          torch.equal(a, b) for a, b in ((other.area, got.area), (other.inner, got.inner),
                                                          (other.outer, got.outer)))
                                     for other in (split, blocks, *grouped)]}
# the anchor's candidates with the kernel and without, on the tiny SAM
anchor = SamAnchor(BUILDERS["vit_tiny"](None), SamPrecomputeConfig(
    points_per_side=4, pred_iou_thresh=0.0, stability_score_thresh=0.0, point_batch_size=12, fused_masks=False),
    variant="vit_tiny", checkpoint="(random)", checkpoint_sha256="", bf16=False)
for p in anchor.sam.mask_decoder.parameters():
    p.data.normal_(0, 0.5)  # logits around the +-1 of the stability score
emb = anchor.embed(torch.randint(0, 256, (2, anchor.input_size, anchor.input_size, 3), dtype=torch.uint8))
every = anchor.mask_candidates(emb)  # thresholds at the medians: both bite
anchor.amg.pred_iou_thresh = float(every["iou"].median())
anchor.amg.stability_score_thresh = float(every["stability"].median())
# the grouped kernel through the anchor, with a launch of two programs per prompt that only it takes
for fused, kernel, launch in ((True, "subpixels", None), (False, "subpixels", None), (True, "grouped", {"GROUP": 2})):
    anchor.fused_masks, anchor.mask_kernel = fused, kernel
    h, w = anchor.sam.prompt_encoder.image_embedding_size
    anchor.mask_launch = launch and {**launch, "BLOCK": h * w // 2}
    cand, sel = anchor.mask_candidates(emb), anchor.automatic_masks(emb)
    key = kernel if kernel == "grouped" else str(fused)
    out[key] = {"n": len(cand["iou"]), "image": cand["image"].tolist(), "point": cand["point"].tolist(),
                "iou": cand["iou"].tolist(), "stability": cand["stability"].tolist(),
                "masks": cand["masks"].flatten().tolist(), "count": sel.count.tolist(),
                "points": sel.points.flatten().tolist()}
print(json.dumps(out))
"""


def test_fused_mask_statistics_equal_the_logits_path():
    """precompute.sam.fused_masks: the Triton kernel (in Triton's interpreter on the CPU) gives the masks and counts
    of the logits' path at the real decoder's widths, and the anchor the same candidates and selected masks."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", FUSED_MASKS_CHECK], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1], timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    real = out["real_widths"]
    assert real["flipped"] <= 2 and real["pixels"] == 3 * 256 * 256
    # one program per sub-pixel of the first upscaling, two programs per prompt, and the grouped kernel (4 and 2
    # programs; 4 and 1 sub-pixels per product): the same sums
    assert real["split_same"] == [True, True, True, True]
    ref_counts, got_counts = real["counts"]
    for ref, got in zip(ref_counts, got_counts, strict=True):
        assert all(abs(a - b) <= 2 for a, b in zip(ref[0], got[0], strict=True))
    plain = out["False"]
    assert 10 < plain["n"] < 2 * 16 * 3  # both thresholds bite
    for fused in (out["True"], out["grouped"]):  # precompute.sam.mask_kernel: subpixels, grouped
        assert fused["n"] == plain["n"]
        for key in ("image", "point", "iou", "count", "points"):
            assert fused[key] == plain[key], key
        assert max(abs(a - b) for a, b in zip(fused["stability"], plain["stability"], strict=True)) < 1e-5
        assert sum(a != b for a, b in zip(fused["masks"], plain["masks"], strict=True)) <= 2


def test_a_gpu_that_fits_no_mask_kernel_configuration_names_the_switch_to_turn_off():
    """The autotuner raises OutOfResources when no configuration fits (shared memory or registers); the anchor's
    error names the GPU, the kernel and precompute.sam.fused_masks, and keeps the cause."""
    from triton.runtime.errors import OutOfResources

    from precompute.anchors.sam_masks import fitting_launch

    with pytest.raises(RuntimeError, match=r"\(grouped\).*NVIDIA A100.*fused_masks off.*mask_kernel=subpixels") as err:
        with fitting_launch("grouped", "NVIDIA A100-SXM4-40GB"):
            raise OutOfResources(173056, 166912, "shared memory")
    assert isinstance(err.value.__cause__, OutOfResources)
    with fitting_launch("subpixels", "any"):  # a launch that fits passes through
        pass


def test_the_mask_kernel_reads_the_tf32_setting_as_use_tf32_writes_it():
    """precompute.tf32 turns TF32 on through torch's new API (fp32_precision); reading the legacy allow_tf32 after that
    raises (torch >= 2.9), which stopped the fused masks in fp32 on an H100. Half-precision tokens ignore it."""
    from covt.compute import use_tf32
    from precompute.anchors.sam_masks import kernel_precision

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        assert kernel_precision(torch.float32, True) == "tf32x3" and kernel_precision(torch.float32, False) == "ieee"
        use_tf32(True)
        assert kernel_precision(torch.float32, True) == "tf32" and kernel_precision(torch.float32, False) == "ieee"
        assert kernel_precision(torch.bfloat16, True) == "tf32"
    finally:
        matmul.fp32_precision = before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiles the Triton kernel: needs a CUDA device")
@pytest.mark.parametrize("kernel", ["subpixels", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_mask_statistics_on_the_gpu_equal_the_logits_path(dtype, kernel):
    from precompute.anchors.sam import BUILDERS
    from precompute.anchors.sam_fast import multimask_logits
    from precompute.anchors.sam_masks import mask_statistics, statistics_of_logits

    torch.manual_seed(0)
    sam = BUILDERS["vit_b"](None).eval().cuda()
    for p in sam.mask_decoder.parameters():
        p.data.normal_(0, 0.3)
    keys, tokens = torch.randn(5, 64 * 64, 256, device="cuda"), torch.randn(5, 3, 256, device="cuda")
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    matmul.fp32_precision = "ieee"  # IEEE products on both sides in fp32
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            ref = statistics_of_logits(multimask_logits(sam, keys.to(dtype), tokens), 0.0, 1.0)
            got = mask_statistics(sam, keys.to(dtype), tokens, 0.0, 1.0, kernel=kernel)
    finally:
        matmul.fp32_precision = before
    flipped = float((ref.masks != got.masks).float().mean())
    assert flipped < (1e-5 if dtype == torch.float32 else 2e-2)
    for a, b in ((ref.area, got.area), (ref.inner, got.inner), (ref.outer, got.outer)):
        assert float(((a - b).abs() / a.clamp_min(1)).max()) < (1e-4 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("tokens, precision, block, subpixels", [
    ("*bf16", "tf32", 64, 4), ("*bf16", "tf32", 128, 1), ("*fp32", "tf32", 32, 4), ("*fp32", "tf32x3", 64, 1)])
def test_fused_mask_kernel_compiles_for_a_hopper_gpu(tokens, precision, block, subpixels):
    """The kernel through Triton's compiler for sm_90 (no GPU needed: it stops at the binary), at the real
    decoder's widths: what the interpreter does not check (constexpr globals, dot shapes, shared memory)."""
    from precompute.anchors.sam_masks import MASK_COLUMNS, mask_statistics_kernel

    constants = {"C": 256, "C1": 64, "C2": 32, "M": 3, "MP": MASK_COLUMNS, "BLOCK": block, "PRECISION": precision,
                 "SUBPIXELS": subpixels}
    kernel = compile_for_hopper(mask_statistics_kernel, tokens, constants, {"num_warps": 4})
    assert kernel.asm["cubin"] and kernel.metadata.shared <= 227 * 1024


@pytest.mark.parametrize("tokens, block, group, warps", [("*bf16", 32, 4, 8), ("*bf16", 64, 1, 8), ("*fp32", 64, 1, 8)])
def test_grouped_mask_kernel_compiles_for_a_hopper_gpu(tokens, block, group, warps):
    """precompute.sam.mask_kernel: grouped, through Triton's compiler for sm_90 at the real decoder's widths."""
    from precompute.anchors.sam_masks import grouped_mask_statistics_kernel

    constants = {"C": 256, "C1": 64, "C2": 32, "M": 3, "MG": 4, "BLOCK": block, "PRECISION": "tf32", "GROUP": group}
    kernel = compile_for_hopper(grouped_mask_statistics_kernel, tokens, constants,
                                {"num_warps": warps, "num_stages": 1})
    assert kernel.asm["cubin"] and kernel.metadata.shared <= 227 * 1024


def compile_for_hopper(kernel, tokens: str, constants: dict, options: dict):
    """A mask kernel compiled for sm_90 with ``tokens`` (and the weights) of that pointer type and ``constants``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    names = kernel.arg_names
    pointers = dict.fromkeys(["b1_ptr", "norm_w_ptr", "norm_b_ptr", "b2_ptr", "hyper_ptr"], "*fp32")
    signature = {"tokens_ptr": tokens, "w1_ptr": tokens, "w2_ptr": tokens, **pointers, "masks_ptr": "*i8",
                 "counts_ptr": "*i32", "n_tokens": "i32", "width": "i32", "eps": "fp32", "threshold": "fp32",
                 "offset": "fp32"}
    signature.update(dict.fromkeys(constants, "constexpr"))
    source = ASTSource(kernel, signature, {(names.index(k),): v for k, v in constants.items()})
    return compile(source, target=GPUTarget("cuda", 90, 32), options=options)
