"""Anchor heads: losses train, SAM's batched decode matches segment_anything, matching is right, sizes come from dims.

The heads' maths against the reference's own functions: tests/test_reference_heads.py.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from covt.anchors import ANCHORS, array_shape
from covt.config import load_config
from precompute.anchors.pidinet import CONFIGS, PiDiNet, PidinetAnchor
from trainer.heads import CacheDims, build_heads, decoder_files, heads_metadata, uses_projection_lr
from trainer.heads.sam import dice_coefficients, match_masks, match_masks_on_device, sam_token_loss
from trainer.settings import RunSettings
from trainer.train import build_job_heads

HIDDEN = 48
REPO = Path(__file__).resolve().parents[1]
BATCH = 2
PIDINET_VIEW = 24
PIDINET_CHANNELS = 8

DIMS = {
    "sam": {"embed_dim": 32, "embed_h": 8, "embed_w": 8, "max_masks": 4, "mask_h": 32, "mask_w": 32},
    "depth": {"layers": 4, "patches": 16, "dim": 24, "map_h": 20, "map_w": 20},
    "dino": {"tokens": 17, "dim": 32},
    "pidinet": {"map_h": 16, "map_w": 16},
    "siglip": {"dim": 16},
    "metaclip": {"dim": 24},
}


# ------------------------------------------------------------ decoder files
def write_tiny_sam_decoder(path, embed_dim=32, embed_hw=8, seed=0, hyper_gain=6.0):
    """A seeded random SAM prompt encoder + mask decoder, saved in precompute's sam_decoder.pt format."""
    torch.manual_seed(seed)
    arch = {
        "prompt_embed_dim": embed_dim, "image_embedding_size": (embed_hw, embed_hw),
        "input_image_size": (16 * embed_hw, 16 * embed_hw), "mask_in_chans": 8,
        "transformer": {"depth": 2, "embedding_dim": embed_dim, "mlp_dim": 64, "num_heads": 2},
        "num_multimask_outputs": 3, "iou_head_depth": 3, "iou_head_hidden_dim": 32,
    }
    t = arch["transformer"]
    prompt_encoder = PromptEncoder(embed_dim=embed_dim, image_embedding_size=arch["image_embedding_size"],
                                   input_image_size=arch["input_image_size"], mask_in_chans=8)
    mask_decoder = MaskDecoder(transformer_dim=embed_dim,
                               transformer=TwoWayTransformer(depth=t["depth"], embedding_dim=embed_dim,
                                                             mlp_dim=t["mlp_dim"], num_heads=t["num_heads"]),
                               num_multimask_outputs=3, iou_head_depth=3, iou_head_hidden_dim=32)
    with torch.no_grad():  # default init gives logits of ~0.03; a trained SAM's are of order 10
        for mlp in mask_decoder.output_hypernetworks_mlps:
            for layer in mlp.layers:
                layer.weight.mul_(hyper_gain)
    torch.save({**arch, "prompt_encoder": prompt_encoder.state_dict(), "mask_decoder": mask_decoder.state_dict()},
               path)
    return prompt_encoder, mask_decoder


def write_tiny_pidinet_stage1(folder, seed=0):
    """A seeded random narrow PIDINet's first stage, exported by precompute's own exporter."""
    torch.manual_seed(seed)
    net = PiDiNet(CONFIGS["baseline"], width=PIDINET_CHANNELS, dil=4, sa=True)
    checkpoint = folder / "pidinet_tiny.pth"  # the exporter fingerprints its checkpoint
    torch.save(net.state_dict(), checkpoint)
    anchor = PidinetAnchor(net, "baseline", str(checkpoint))
    anchor.input_size = PIDINET_VIEW
    assert anchor.export_decoders(folder) == ["pidinet_stage1.pt2", "pidinet_stage1.json"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    decoders = tmp_path_factory.mktemp("decoders")
    write_tiny_sam_decoder(decoders / "sam_decoder.pt")
    write_tiny_pidinet_stage1(decoders)
    return CacheDims(DIMS, decoders)


# ------------------------------------------------------------ targets
def blob_masks(generator, count, size):
    """``count`` random rectangles (bool) at ``size`` x ``size``."""
    masks = torch.zeros(count, size, size, dtype=torch.bool)
    for m in masks:
        y0, x0 = torch.randint(0, size // 2, (2,), generator=generator).tolist()
        h, w = torch.randint(size // 4, size // 2, (2,), generator=generator).tolist()
        m[y0:y0 + h, x0:x0 + w] = True
    return masks


def smooth_map(generator, batch, h, w):
    """Low-frequency maps in [0, 1] (what depth and edge maps look like to an L1 loss)."""
    coarse = torch.rand(batch, 1, 4, 4, generator=generator)
    return F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)[:, 0]


def make_targets(anchor, batch=BATCH, seed=0):
    g = torch.Generator().manual_seed(seed)
    dims = DIMS[anchor]
    if anchor == "sam":
        counts = torch.tensor([3, 0, 2, 4, 1][:batch])
        masks = torch.zeros(batch, *array_shape("sam", "masks", dims), dtype=torch.bool)
        for b in range(batch):
            masks[b, :counts[b]] = blob_masks(g, int(counts[b]), dims["mask_h"])
        return {"embedding": torch.randn(batch, *array_shape("sam", "embedding", dims), generator=g),
                "masks": masks, "mask_count": counts}
    if anchor == "depth":
        return {"features": torch.randn(batch, *array_shape("depth", "features", dims), generator=g),
                "depth": smooth_map(g, batch, dims["map_h"], dims["map_w"])}
    if anchor == "pidinet":
        return {"edges": block_edges(block_views(batch, seed), dims["map_h"], dims["map_w"])}
    spec = ANCHORS[anchor]
    return {a.name: torch.randn(batch, *array_shape(anchor, a.name, dims), generator=g) for a in spec.arrays}


def block_views(batch, seed, size=PIDINET_VIEW, blocks=4):
    """uint8 images of flat-coloured blocks: their edges are what the edge target marks."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.randint(0, 256, (batch, 3, blocks, blocks), generator=g, dtype=torch.uint8)
    return F.interpolate(colours, size=(size, size), mode="nearest")


def block_edges(views, h, w):
    """1 where a pixel's colour differs from its right or lower neighbour, resized to h x w."""
    v = views.float()
    edge = torch.zeros(v.shape[0], 1, *v.shape[-2:])
    edge[..., :, :-1] += (v[..., :, 1:] != v[..., :, :-1]).any(1, keepdim=True)
    edge[..., :-1, :] += (v[..., 1:, :] != v[..., :-1, :]).any(1, keepdim=True)
    return F.interpolate(edge.clamp(max=1), size=(h, w), mode="bilinear", align_corners=False)[:, 0]


def make_views(head, batch=BATCH, seed=0):
    return None if head.view_size is None else block_views(batch, seed, head.view_size)


def make_thoughts(anchor, batch=BATCH, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, ANCHORS[anchor].tokens, HIDDEN, generator=g)


# ------------------------------------------------------------ tests
@pytest.mark.parametrize("anchor", list(DIMS))
def test_loss_decreases_when_only_its_head_and_the_thoughts_train(cache, anchor):
    torch.manual_seed(0)
    head = build_heads([anchor], HIDDEN, cache)[anchor]
    targets, views = make_targets(anchor), make_views(head)
    thoughts = nn.Parameter(make_thoughts(anchor))
    optimizer = torch.optim.Adam([*head.parameters(), thoughts], lr=1e-2)
    losses = []
    for _ in range(40):
        loss = head(thoughts, targets, views)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    # sam: a random tiny decoder reachable only through sparse prompts leaves a dice floor (~0.66 of the start)
    ratio = 0.75 if anchor == "sam" else 0.7
    assert losses[-1] < ratio * losses[0], f"{anchor}: {losses[0]:.4f} -> {losses[-1]:.4f}"


@pytest.mark.parametrize("anchor", list(DIMS))
def test_decode_gives_the_cached_target_shape(cache, anchor):
    head = build_heads([anchor], HIDDEN, cache)[anchor]
    targets = make_targets(anchor)
    out = head.decode(make_thoughts(anchor), targets, make_views(head))
    if anchor == "sam":  # one mask per thought token
        assert out.shape == (BATCH, ANCHORS["sam"].tokens, DIMS["sam"]["mask_h"], DIMS["sam"]["mask_w"])
    else:
        main_array = {"depth": "depth", "dino": "features", "pidinet": "edges"}.get(anchor, "embedding")
        assert out.shape == targets[main_array].shape


def test_batched_sam_decode_equals_segment_anything_one_prompt_at_a_time(tmp_path):
    # the reference's decode: each prompt alone as a sparse embedding, no_mask_embed dense,
    # multimask_output=False, then Sam.postprocess_masks to the mask size
    prompt_encoder, mask_decoder = write_tiny_sam_decoder(tmp_path / "sam_decoder.pt", seed=3)
    encoder_size = prompt_encoder.input_image_size[0]
    sam = Sam(ImageEncoderViT(img_size=encoder_size, patch_size=16, embed_dim=16, depth=1, num_heads=2,
                              out_chans=DIMS["sam"]["embed_dim"]), prompt_encoder, mask_decoder)
    head = build_heads(["sam"], HIDDEN, CacheDims(DIMS, tmp_path))["sam"].eval()
    batch = 3
    targets = make_targets("sam", batch=batch)
    thoughts = make_thoughts("sam", batch=batch)
    with torch.no_grad():
        batched = head.decode(thoughts, targets)
        prompts = head.prompts(thoughts)
        for i in range(batch):
            for k in range(prompts.shape[1]):
                sparse, dense = prompt_encoder(points=None, boxes=None, masks=None)
                sparse = torch.cat([sparse, prompts[i, k].reshape(1, 1, -1)], dim=1)
                low_res, _ = mask_decoder(image_embeddings=targets["embedding"][i:i + 1],
                                          image_pe=prompt_encoder.get_dense_pe(), sparse_prompt_embeddings=sparse,
                                          dense_prompt_embeddings=dense, multimask_output=False)
                expected = sam.postprocess_masks(low_res, (encoder_size, encoder_size),
                                                 (DIMS["sam"]["mask_h"], DIMS["sam"]["mask_w"]))
                torch.testing.assert_close(batched[i, k], expected[0, 0], rtol=1e-4, atol=1e-4)


def test_sam_decoder_is_frozen_outside_the_head_but_passes_gradients_to_the_thoughts(cache):
    head = build_heads(["sam"], HIDDEN, cache)["sam"]
    assert not any(k.startswith(("frozen", "prompt_encoder", "mask_decoder")) for k in head.state_dict())
    thoughts = nn.Parameter(make_thoughts("sam"))
    head(thoughts, make_targets("sam")).backward()
    assert thoughts.grad is not None and thoughts.grad.abs().sum() > 0
    decoder = head.frozen.on(torch.device("cpu"))
    assert all(not p.requires_grad and p.grad is None for p in decoder.parameters())
    assert {id(p) for p in decoder.parameters()}.isdisjoint(id(p) for p in head.parameters())


def matching_cost(logits, masks):
    return 1 - dice_coefficients(logits, masks.float())


@pytest.mark.parametrize("match", [match_masks, match_masks_on_device], ids=["scipy", "device"])
def test_hungarian_matching_finds_the_permutation(match):
    g = torch.Generator().manual_seed(0)
    references = blob_masks(g, 4, 32).unsqueeze(0)  # (1, 4, 32, 32)
    permutation = [2, 0, 3, 1]  # prediction i looks like reference permutation[i]
    logits = torch.full((1, 6, 32, 32), -8.0)
    for i, j in enumerate(permutation):
        logits[0, i] = references[0, j].float() * 16 - 8
    assignment = match(matching_cost(logits, references), torch.tensor([4]))
    assert assignment[0].tolist() == permutation + [-1, -1]
    # only the first two references are real: each goes to its look-alike, the rest stay unmatched
    assignment = match(matching_cost(logits, references), torch.tensor([2]))
    assert assignment[0].tolist() == [-1, 0, -1, 1, -1, -1]


def test_device_matching_finds_scipys_assignment():
    """train.sam_matching=device: the same assignment as scipy's linear_sum_assignment wherever the cheapest is
    unique (random costs: always), for every count from none (or a negative one) to more than the masks held."""
    g = torch.Generator().manual_seed(2)
    for masks in range(1, 9):
        for predictions in (masks, 8):
            cost = torch.rand(6, predictions, masks, generator=g)
            counts = torch.tensor([-1, 0, 1, masks // 2, masks, masks + 3])
            on_device = match_masks_on_device(cost, counts)
            assert torch.equal(on_device, match_masks(cost, counts)), (predictions, masks)
            assert on_device.dtype == torch.long and (on_device[:2] == -1).all()
    with pytest.raises(ValueError, match="train.sam_matching: scipy"):
        match_masks_on_device(torch.rand(1, 9, 4), torch.tensor([4]))
    with pytest.raises(ValueError, match="no more reference masks than predictions"):
        match_masks_on_device(torch.rand(1, 4, 6), torch.tensor([6]))


@pytest.mark.parametrize("matching", ["scipy", "device"])
def test_the_config_chooses_where_the_sam_head_matches(cache, matching):
    cfg = load_config(REPO / "configs/tiny.yaml", ["anchors=[sam]", f"train.sam_matching={matching}"])
    head = build_job_heads(cfg, RunSettings.resolve(cfg, 1), HIDDEN, cache, 0.02)["sam"]
    assert head.matching == matching
    reference = build_heads(["sam"], HIDDEN, cache)["sam"]
    reference.load_state_dict(head.state_dict())
    assert reference.matching == "scipy"  # the reference's, unless the config says otherwise
    thoughts, targets = make_thoughts("sam"), make_targets("sam")
    assert head(thoughts, targets) == reference(thoughts, targets)


def test_sam_token_loss_is_low_for_the_right_masks_in_any_order():
    g = torch.Generator().manual_seed(1)
    references = blob_masks(g, 3, 32).unsqueeze(0)
    right = torch.full((1, 4, 32, 32), -12.0)
    right[0, [2, 0, 1]] = references[0].float() * 24 - 12  # shuffled, plus one background prediction
    wrong = torch.full((1, 4, 32, 32), -12.0)
    wrong[0, :3] = (~references[0]).float() * 24 - 12
    counts = torch.tensor([3])
    assert sam_token_loss(right, references, counts) < 0.01
    assert sam_token_loss(wrong, references, counts) > 1.0
    for logits in (right, wrong):
        assert sam_token_loss(logits, references, counts, "device") == sam_token_loss(logits, references, counts)


def test_sam_loss_of_an_image_without_reference_masks_is_zero_but_stays_in_the_graph(cache):
    head = build_heads(["sam"], HIDDEN, cache)["sam"]
    targets = make_targets("sam")
    targets["mask_count"] = torch.zeros(BATCH, dtype=torch.long)
    thoughts = nn.Parameter(make_thoughts("sam"))
    loss = head(thoughts, targets)
    assert loss.item() == 0.0  # the reference: no masks -> 0
    loss.backward()  # DDP / ZeRO still see a (zero) gradient for every head parameter
    assert all(p.grad is not None for p in head.parameters())
    assert torch.equal(thoughts.grad, torch.zeros_like(thoughts))


def test_reference_projection_lr_rule_selects_projection_queries_and_attention_not_depth_generator(cache):
    heads = build_heads(list(DIMS), HIDDEN, cache)
    for anchor, head in heads.items():
        names = [n for n, _ in head.named_parameters()]
        slow = {n for n in names if uses_projection_lr(f"heads.{anchor}.{n}")}
        if anchor == "depth":  # depth_token_generator: the base lr when it trains (the reference's stays frozen)
            assert names and not slow and all(n.startswith("depth_token_generator.") for n in names), names
            continue
        assert slow == set(names), (anchor, set(names) - slow)
        assert {n.split(".")[1] for n in names} == {"thought_projection", "query_vectors", "cross_attention"}
        attention = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias")  # nn.MultiheadAttention's
        assert {n for n in names if "cross_attention" in n} == {f"attend.cross_attention.{p}" for p in attention}


def test_head_sizes_come_from_the_cache_dims(cache):
    other = CacheDims({**DIMS, "dino": {"tokens": 5, "dim": 64}, "depth": {**DIMS["depth"], "dim": 40},
                       "siglip": {"dim": 40}}, cache.decoders_dir)
    small = build_heads(["dino", "depth", "siglip"], HIDDEN, cache)
    large = build_heads(["dino", "depth", "siglip"], 96, other)
    assert small["dino"].attend.query_vectors.shape == (17, 32)
    assert large["dino"].attend.query_vectors.shape == (5, 64)
    assert small["depth"].depth_token_generator[-1].out_features == 24
    assert large["depth"].depth_token_generator[-1].out_features == 40
    assert large["depth"].depth_token_generator[0].weight.shape == (96, 96)  # Linear(hidden, hidden) first
    assert small["siglip"].attend.thought_projection.out_features == 16
    assert large["siglip"].attend.thought_projection.weight.shape == (40, 96)
    out = large["dino"].decode(torch.randn(2, ANCHORS["dino"].tokens, 96))
    assert out.shape == (2, 5, 64)


def test_sam_head_rejects_a_decoder_that_does_not_fit_the_cached_embedding(cache):
    wrong = CacheDims({**DIMS, "sam": {**DIMS["sam"], "embed_dim": 64}}, cache.decoders_dir)
    with pytest.raises(ValueError, match="sam_decoder.pt"):
        build_heads(["sam"], HIDDEN, wrong)


def test_missing_decoder_file_error_names_the_file(tmp_path):
    for anchor, name in (("sam", "sam_decoder.pt"), ("pidinet", "pidinet_stage1.pt2")):
        with pytest.raises(FileNotFoundError, match=name):
            build_heads([anchor], HIDDEN, CacheDims(DIMS, tmp_path))


def test_wrong_target_shape_error_names_the_array(cache):
    head = build_heads(["depth"], HIDDEN, cache)["depth"]
    targets = make_targets("depth")
    targets["depth"] = targets["depth"][:, :10]
    with pytest.raises(ValueError, match="depth/depth"):
        head(make_thoughts("depth"), targets)


def test_pidinet_head_asks_for_views_of_the_exported_input_size(cache):
    head = build_heads(["pidinet"], HIDDEN, cache)["pidinet"]
    assert head.view_size == PIDINET_VIEW
    with pytest.raises(ValueError, match="views"):
        head(make_thoughts("pidinet"), make_targets("pidinet"), None)


def test_heads_run_under_bf16_autocast(cache):
    heads = build_heads(list(DIMS), HIDDEN, cache)
    for anchor, head in heads.items():
        thoughts = nn.Parameter(make_thoughts(anchor))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = head(thoughts, make_targets(anchor), make_views(head))
        assert loss.dtype == torch.float32 and torch.isfinite(loss), anchor
        loss.backward()
        assert torch.isfinite(thoughts.grad).all(), anchor


def test_saved_heads_rebuild_from_metadata_and_decoder_files(cache, tmp_path):
    heads = build_heads(list(DIMS), HIDDEN, cache)
    meta = heads_metadata(heads)
    assert meta["decoder_files"] == ["pidinet_stage1.json", "pidinet_stage1.pt2", "sam_decoder.pt"]
    for f in decoder_files(heads):
        (tmp_path / f.name).write_bytes(f.read_bytes())
    meta = json.loads(json.dumps(meta))
    rebuilt = build_heads(meta["anchors"], meta["hidden_size"], CacheDims(meta["dims"], tmp_path))
    rebuilt.load_state_dict(heads.state_dict())
    for anchor in DIMS:
        thoughts, targets, views = make_thoughts(anchor), make_targets(anchor), make_views(heads[anchor])
        with torch.no_grad():
            torch.testing.assert_close(rebuilt[anchor].decode(thoughts, targets, views),
                                       heads[anchor].decode(thoughts, targets, views))


@pytest.mark.parametrize("anchor", list(DIMS))
def test_zero_targets_give_a_finite_loss_that_reaches_every_parameter(cache, anchor):
    """What a head runs on when it has nothing to score but every rank needs its gradients (CoVTModel.every_head):
    the cache's shapes, a finite loss (times 0.0 it stays an exact zero), a gradient for every parameter."""
    head = build_heads([anchor], HIDDEN, cache)[anchor]
    targets, views = head.zero_targets(1)
    assert (views is None) == (head.view_size is None)
    loss = head(torch.randn(1, ANCHORS[anchor].tokens, HIDDEN), targets, views)
    assert torch.isfinite(loss)
    (loss * 0.0).backward()
    assert all(p.grad is not None and not p.grad.any() for p in head.parameters())
    with pytest.raises(ValueError, match="no thoughts to score"):
        head(torch.zeros(0, ANCHORS[anchor].tokens, HIDDEN), targets, views)


def test_heads_consume_the_targets_and_views_the_cache_reader_yields(synthetic_cache, tmp_path):
    from covt.images import square_view
    from shards.reader import Cache

    shutil.copytree(synthetic_cache, tmp_path / "cache")  # the session's cache is shared: add decoders to a copy
    cache = Cache(tmp_path / "cache")
    cache.decoders_dir.mkdir(exist_ok=True)
    sam = cache.dims("sam")
    write_tiny_sam_decoder(cache.decoders_dir / "sam_decoder.pt", embed_dim=sam["embed_dim"], embed_hw=sam["embed_h"])
    write_tiny_pidinet_stage1(cache.decoders_dir)
    heads = build_heads(cache.anchors, HIDDEN, cache)
    samples = [cache.sample(i) for i in range(2)]
    for anchor, head in heads.items():
        targets = {name: torch.stack([s["targets"][anchor][name] for s in samples])
                   for name in samples[0]["targets"][anchor]}
        views = None if head.view_size is None else torch.stack(
            [torch.from_numpy(square_view(s["images"][0], head.view_size).copy()).permute(2, 0, 1) for s in samples])
        thoughts = nn.Parameter(make_thoughts(anchor))
        loss = head(thoughts, targets, views)
        loss.backward()
        assert loss.ndim == 0 and torch.isfinite(loss), anchor
        assert thoughts.grad.abs().sum() > 0, anchor
