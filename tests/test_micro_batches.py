"""A global batch gives the same loss and gradients however it is cut into micro-batches.

The recipe's global batch is 8 samples; on 1 GPU it runs as one micro-batch of 8, on 4 GPUs as 4 x 2, on
8 GPUs as 8 x 1 (the reference). The loss is the mean over samples of (each sample's mean token loss +
its anchor losses), so every cut must give the same number and the same gradients; packed micro-batches
(train.packing: a micro-batch's samples in one row, each with its own rope positions and attention) too.
"""
import dataclasses
import inspect
import shutil
from collections import Counter
from contextlib import contextmanager, nullcontext

import pytest
import torch
from test_heads import write_tiny_pidinet_stage1, write_tiny_sam_decoder
from torch.utils._python_dispatch import TorchDispatchMode

from covt.config import Config, ModelConfig, StageConfig, TrainConfig
from shards.reader import Cache
from trainer.batch import BatchBuilder, build_batch, sample_count
from trainer.heads import build_heads
from trainer.host_inputs import HOST_INPUT_KEYS, without_host_inputs
from trainer.model import CARRIED_ROWS, CoVTModel, last_hidden_states, text_hidden_size, unwrap_vlm
from trainer.schedule import Schedule
from trainer.settings import BatchSettings, RunSettings
from trainer.step_graphs import layout
from trainer.text_attention import TEXT_ATTENTION, use_packed_text_attention, use_sdpa_text_attention
from trainer.tiny_model import build_tiny_base_model
from trainer.tokens import add_thought_tokens
from trainer.train import carried_parts
from trainer.validation import validation_losses

ANCHORS = ["sam", "depth", "dino", "pidinet", "siglip", "metaclip"]
GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory, synthetic_cache):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    base = build_tiny_base_model(tmp_path_factory.mktemp("model") / "base", seed=0, image_size=112)
    folder = tmp_path_factory.mktemp("cache") / "cache"
    shutil.copytree(synthetic_cache, folder)  # the session's cache is shared: add decoders to a copy
    cache = Cache(folder)
    cache.decoders_dir.mkdir(exist_ok=True)
    sam = cache.dims("sam")
    write_tiny_sam_decoder(cache.decoders_dir / "sam_decoder.pt", embed_dim=sam["embed_dim"], embed_hw=sam["embed_h"])
    write_tiny_pidinet_stage1(cache.decoders_dir)
    processor = AutoProcessor.from_pretrained(base)
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(base, dtype=torch.float32)
    tokens = add_thought_tokens(processor, vlm, seed=0)
    torch.manual_seed(0)
    model = CoVTModel(vlm, build_heads(ANCHORS, text_hidden_size(vlm), cache), tokens).eval()
    cfg = Config(anchors=ANCHORS, model=ModelConfig(image_size=112), train=TrainConfig(max_length=1024))
    samples = [cache.sample(i % len(cache)) for i in range(GLOBAL_BATCH)]
    for i, s in enumerate(samples):
        s["index"] = i  # distinct stage-4 draws for the repeated sample
    return model, processor, tokens, BatchSettings.from_config(cfg), samples


def named_loss_and_gradients(setup, micro: int, stage: StageConfig, step: int, packing: bool = False,
                             global_batch: int = GLOBAL_BATCH, anchor_losses: bool = True, multiple: int = 1,
                             every_row: bool = False):
    model, processor, tokens, settings, samples = setup
    settings = dataclasses.replace(settings, packing=packing, pad_to_multiple_of=multiple, every_anchor_row=every_row)
    model.zero_grad(set_to_none=True)
    chunks = [samples[i:i + micro] for i in range(0, global_batch, micro)]
    total = 0.0
    for chunk in chunks:
        batch = build_batch(chunk, stage, True, step, processor, tokens, settings, view_sizes=model.view_sizes())
        loss = model(batch, anchor_losses=anchor_losses)["loss"] / len(chunks)  # gradient accumulation, or ranks' mean
        loss.backward()
        total += loss.item()
    return total, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def loss_and_gradients(setup, micro: int, stage: StageConfig, step: int, packing: bool = False):
    total, grads = named_loss_and_gradients(setup, micro, stage, step, packing)
    return total, torch.cat([g.flatten() for g in grads.values()])


# stage 4 (efficient_reasoning): rows without thoughts, subsets of anchors, plain answers
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("stage,step", [("understanding", 0), ("efficient_reasoning", 3)])
def test_global_batch_cut_8x1_4x2_2x4_1x8_gives_one_loss_and_gradient(setup, stage, step, packing):
    stage = StageConfig(stage, 1)
    loss_1, grads_1 = loss_and_gradients(setup, 1, stage, step)  # padded (one sample: nothing to pad or pack)
    assert grads_1.abs().sum() > 0
    # fp32 summation order differs between cuts (measured ~3e-7 padded); packed rows change the hidden states'
    # last bits, which the anchor heads amplify (measured <= 6e-5, see the packed test below); a wrong
    # normalisation is off by percents
    tolerance = 3e-4 if packing else 1e-5
    for micro in (2, 4, 8):
        loss, grads = loss_and_gradients(setup, micro, stage, step, packing)
        assert loss == pytest.approx(loss_1, rel=1e-5), micro
        assert float((grads - grads_1).norm() / grads_1.norm()) < tolerance, micro
        assert float((grads - grads_1).abs().max()) < tolerance * float(grads_1.abs().max()), micro


@pytest.mark.parametrize("stage,step", [("understanding", 0), ("efficient_reasoning", 3)])
def test_a_step_cut_by_length_pads_less_and_gives_the_stream_orders_loss_and_gradients(setup, stage, step):
    """train.sort_step_by_length: the trainer's collate_fn gets a whole step's samples and cuts them into
    micro-batches longest first. The step holds the same samples, so the loss and every gradient are those of
    the micro-batches in stream order (fp32 summation order only, as the cuts above), with fewer padded tokens."""
    model, processor, tokens, settings, samples = setup
    stage = StageConfig(stage, step + 1, merge_after=True)
    schedule = Schedule((stage,))
    for micro in (2, 4):
        builder = BatchBuilder(schedule, GLOBAL_BATCH, processor, tokens, settings, model.view_sizes(),
                               micro_batches=GLOBAL_BATCH // micro)
        # the stream's slots of optimizer step ``step``, as StreamingDataset.read numbers them
        slotted = [{**s, "position": step * GLOBAL_BATCH + i} for i, s in enumerate(samples)]
        by_length = builder(slotted)
        assert [b["step"] for b in by_length] == [step] * (GLOBAL_BATCH // micro)
        assert sorted(k for b in by_length for k in b["keys"]) == sorted(s["key"] for s in samples)
        in_order = [build_batch(samples[i:i + micro], stage, True, step, processor, tokens, settings,
                                view_sizes=model.view_sizes()) for i in range(0, GLOBAL_BATCH, micro)]
        padded = {name: sum(b["attention_mask"].numel() for b in batches)
                  for name, batches in (("by_length", by_length), ("in_order", in_order))}
        assert padded["by_length"] < padded["in_order"], padded
        assert sum(int(b["attention_mask"].sum()) for b in by_length) == sum(
            int(b["attention_mask"].sum()) for b in in_order)
        results = {}
        for name, batches in (("by_length", by_length), ("in_order", in_order)):
            model.zero_grad(set_to_none=True)
            total = 0.0
            for batch in batches:
                loss = model(batch)["loss"] / len(batches)
                loss.backward()
                total += loss.item()
            results[name] = total, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        (loss, grads), (loss_in_order, grads_in_order) = results["by_length"], results["in_order"]
        assert loss == pytest.approx(loss_in_order, rel=1e-5), micro
        assert float((grads - grads_in_order).norm() / grads_in_order.norm()) < 1e-5, micro


@pytest.mark.parametrize("stage,step", [("understanding", 0), ("efficient_reasoning", 3)])
def test_padding_to_a_multiple_changes_shapes_not_the_loss_or_gradients(setup, stage, step):
    """train.pad_to_multiple_of (few layouts for train.cuda_graphs): more padded tokens and zero-weight text-loss
    entries, the same function."""
    model, processor, tokens, settings, samples = setup
    stage = StageConfig(stage, 1)
    padded = build_batch(samples[:3], stage, True, step, processor, tokens,
                         dataclasses.replace(settings, pad_to_multiple_of=64), view_sizes=model.view_sizes())
    assert padded["input_ids"].shape[1] % 64 == 0 and padded["has_padding"]
    assert all(len(v) % 64 == 0 for v in padded["text"].values())
    for micro in (1, 4):
        loss, grads = named_loss_and_gradients(setup, micro, stage, step)
        loss_padded, grads_padded = named_loss_and_gradients(setup, micro, stage, step, multiple=64)
        assert loss_padded == pytest.approx(loss, rel=1e-5), micro
        assert grads_padded.keys() == grads.keys()
        flat, flat_padded = (torch.cat([g.flatten() for g in gs.values()]) for gs in (grads, grads_padded))
        assert float((flat_padded - flat).norm() / flat.norm()) < 1e-5, micro


@pytest.mark.parametrize("stage,step", [("understanding", 0), ("efficient_reasoning", 3)])
def test_causal_attention_without_the_padding_mask_gives_the_same_loss_and_gradients(setup, stage, step):
    """train.padding_mask false: a right-padded micro-batch's text attention gets no mask (sdpa's causal kernel),
    and since no real token comes after the padding, the loss and gradients are the padded mask's. The padded
    positions' own hidden states do change (what the mask did), and nothing reads them."""
    model, processor, tokens, settings, samples = setup
    stage = StageConfig(stage, 1)
    batch = build_batch(samples[:4], stage, True, step, processor, tokens, settings, view_sizes=model.view_sizes())
    assert batch["has_padding"]
    masks, hidden = [], {}
    attention = unwrap_vlm(model.vlm).model.language_model.layers[0].self_attn
    hook = attention.register_forward_pre_hook(lambda m, a, kw: masks.append(kw.get("attention_mask")),
                                               with_kwargs=True)
    results = {}
    try:
        for padding_mask in (True, False):
            model.padding_mask = padding_mask
            with torch.no_grad():
                hidden[padding_mask] = last_hidden_states(model.vlm, batch, padding_mask)
            results[padding_mask] = named_loss_and_gradients(setup, 4, stage, step)
    finally:
        hook.remove()
        model.padding_mask = True
    assert isinstance(masks[0], torch.Tensor) and masks[-1] is None
    real = batch["attention_mask"].bool()
    assert torch.allclose(hidden[False][real], hidden[True][real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hidden[False][~real], hidden[True][~real], rtol=1e-3, atol=1e-3)
    (loss, grads), (loss_causal, grads_causal) = results[True], results[False]
    assert loss_causal == pytest.approx(loss, rel=1e-5)
    assert grads_causal.keys() == grads.keys()
    flat, flat_causal = (torch.cat([g.flatten() for g in gs.values()]) for gs in (grads, grads_causal))
    assert float((flat_causal - flat).norm() / flat.norm()) < 1e-5


def test_anchor_parts_over_every_row_give_one_layout_and_the_same_loss_and_gradients(setup):
    """Under train.cuda_graphs each anchor's part spans every row of the micro-batch, with ``carries`` marking the
    rows that drew its thoughts: stage 4's subsets and the plain answers then change values, not shapes (one
    recorded graph instead of one per draw), and the rows without thoughts add exactly nothing."""
    model, processor, tokens, settings, samples = setup
    stage = StageConfig("efficient_reasoning", 1)
    every = dataclasses.replace(settings, every_anchor_row=True, pad_to_multiple_of=64)
    carried_layouts, every_layouts = set(), set()
    for step in range(4):
        for chunk in (samples[:4], samples[4:]):
            carried = build_batch(chunk, stage, True, step, processor, tokens,
                                  dataclasses.replace(every, every_anchor_row=False), view_sizes=model.view_sizes())
            batch = build_batch(chunk, stage, True, step, processor, tokens, every, view_sizes=model.view_sizes())
            for anchor, part in batch["anchors"].items():
                assert part["rows"].tolist() == list(range(len(chunk)))
                assert part["rows"][part["carries"] > 0].tolist() == carried["anchors"][anchor]["rows"].tolist()
            carried_layouts.add(layout(carried))
            every_layouts.add(layout(batch))
    assert len(every_layouts) < len(carried_layouts)
    assert all(len(part["rows"]) == 4 for part in batch["anchors"].values())
    # each anchor's part is reported at every micro-batch, with how many rows carried it: a step logs the parts
    # some row carried, as direct steps do
    with torch.no_grad():
        outputs = model(batch)
    counts = {a: float(outputs[a + CARRIED_ROWS]) for a in batch["anchors"]}
    assert counts == {a: float(carried["anchors"][a]["rows"].numel()) for a in batch["anchors"]}
    logged = carried_parts({name: float(value) for name, value in outputs.items()})
    assert set(logged) == {"loss", "text", *(a for a, n in counts.items() if n > 0)}
    assert carried_parts({"loss": 1.0, "sam": 0.0, "sam" + CARRIED_ROWS: 0.0, "dino": 2.0, "dino" + CARRIED_ROWS: 1.0,
                          "depth": 3.0}) == {"loss": 1.0, "dino": 2.0, "depth": 3.0}
    for stage_name, step in (("efficient_reasoning", 3), ("understanding", 0)):
        for micro in (1, 4):
            loss, grads = named_loss_and_gradients(setup, micro, StageConfig(stage_name, 1), step)
            loss_every, grads_every = named_loss_and_gradients(setup, micro, StageConfig(stage_name, 1), step,
                                                               every_row=True)
            assert loss_every == pytest.approx(loss, rel=1e-6), (stage_name, micro)
            for name, grad in grads_every.items():  # a head no row carries gets zeros here, no gradient there
                reference = grads.get(name, torch.zeros_like(grad))
                assert float((grad - reference).norm()) <= 1e-5 * float(reference.norm()) + 1e-12, (name, micro)
            assert grads.keys() <= grads_every.keys()


def test_validation_scores_the_carried_rows_under_train_cuda_graphs_as_without(setup):
    """Validation runs directly, never as a graph: with every-row parts on (train.cuda_graphs) it gives the losses
    of the carried rows only, not zeros for the rows without thoughts, and reports no row counts."""
    model, processor, tokens, settings, samples = setup
    losses = {}
    for every_row in (False, True):
        run = RunSettings(grad_accum=1, batch_size=2, head_anchors=tuple(ANCHORS), stages=(),
                          batch=dataclasses.replace(settings, every_anchor_row=every_row))
        with torch.no_grad():
            losses[every_row] = validation_losses(model, model, samples, processor, tokens, run,
                                                  torch.device("cpu"), nullcontext)
    assert losses[True].keys() == losses[False].keys() and set(ANCHORS) <= losses[False].keys()
    for name, value in losses[False].items():
        assert losses[True][name] == pytest.approx(value, rel=1e-6), name


@contextmanager
def text_attention(model, name: str):
    """The language model's attention set to ``name`` for the block (transformers' ``sdpa``, or
    trainer.text_attention's per-sample attention of packed rows), then back to sdpa."""
    if name == TEXT_ATTENTION:
        use_packed_text_attention(model.vlm)
    try:
        yield
    finally:
        use_sdpa_text_attention(model.vlm)


@pytest.mark.parametrize("attention", ["sdpa", TEXT_ATTENTION])
@pytest.mark.parametrize("anchor_losses,tolerance", [(False, 1e-5), (True, 1e-3)])
def test_a_packed_micro_batch_gives_the_padded_ones_loss_and_gradients(setup, anchor_losses, tolerance, attention):
    """One row, no padding, each sample's own rope index and attention within it (transformers' sdpa with the
    block-diagonal mask it builds from the packed positions, or trainer.text_attention's per-sample attention,
    the CPU stand-in of its varlen kernel): the same loss (relative 1e-5)
    and the same gradient of every trainable parameter as the right-padded micro-batch, in fp32. Per parameter,
    the gradient differs by at most ``tolerance`` of its norm: 1e-5 from the text loss (measured <= 8e-7; the
    hidden states agree to 2e-7, the attention sums run over other lengths and masks); 1e-3 with the six anchor
    heads (measured <= 1.3e-4: their per-channel normalisation across 4 near-identical thought tokens amplifies
    last-bit differences: the padded path's own gradients move by 2.4e-4 when its hidden states are scaled by
    1 + 2e-7 noise). A sample attending across a boundary changes the loss by 0.2%. The rope positions are each
    sample's own, those of the padded batch (RoPE is relative: positions continued from the previous sample would
    give the same loss up to rounding, so they are compared directly)."""
    model, processor, tokens, settings, samples = setup
    stage = StageConfig("understanding", 1)
    packed = build_batch(samples[:4], stage, True, 0, processor, tokens, dataclasses.replace(settings, packing=True),
                         view_sizes=model.view_sizes())
    padded = build_batch(samples[:4], stage, True, 0, processor, tokens, settings, view_sizes=model.view_sizes())
    assert packed["input_ids"].shape == (1, int(padded["attention_mask"].sum())) and sample_count(packed) == 4
    assert padded["input_ids"].shape[0] == 4 and padded["input_ids"].shape[1] * 4 > packed["input_ids"].shape[1]
    for anchor, part in padded["anchors"].items():  # every thought still points at its pad tokens
        assert (packed["input_ids"][0, packed["anchors"][anchor]["positions"]] == tokens.pad_id[anchor]).all()
        assert len(packed["anchors"][anchor]["rows"]) == len(part["rows"]) > 0
    assert torch.equal(packed["text"]["targets"], padded["text"]["targets"])
    assert torch.equal(packed["text"]["weights"], padded["text"]["weights"])
    keep = padded["attention_mask"].bool()
    # the loader's rope positions (trainer.rope) are the model's own, padded and packed
    rope = unwrap_vlm(model.vlm).model.get_rope_index(padded["input_ids"], padded["mm_token_type_ids"],
                                                      padded["image_grid_thw"], attention_mask=padded["attention_mask"])
    assert torch.equal(padded["position_ids"], rope[0])
    positions = packed["position_ids"]
    assert positions.shape == (4, 1, packed["input_ids"].shape[1])
    assert torch.equal(positions[1:, 0], rope[0][:, keep])
    assert torch.equal(positions[0, 0], torch.cat([torch.arange(int(n)) for n in keep.sum(1)]))

    with text_attention(model, attention):  # padded rows: sdpa either way; packed: block mask, or per sample
        loss, grads = named_loss_and_gradients(setup, 4, stage, 0, False, 4, anchor_losses)
        packed_loss, packed_grads = named_loss_and_gradients(setup, 4, stage, 0, True, 4, anchor_losses)
    assert packed_loss == pytest.approx(loss, rel=1e-5)
    assert packed_grads.keys() == grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        assert float((packed_grads[name] - grad).norm()) <= tolerance * float(grad.norm()), name


# what the model computes from ids and image grids at the start of a forward when the batch does not hold it
HOST_COMPUTED = ("get_rope_index", "get_vision_position_ids", "get_vision_cu_seqlens", "get_vision_window_index",
                 "get_placeholder_mask", "find_packed_sequence_indices", "_ignore_causal_mask_sdpa")
def hidden_and_ops_of(model, batch: dict) -> tuple[torch.Tensor, Counter]:
    """The last hidden states of ``batch``, and how many tensor operations each of :data:`HOST_COMPUTED` issued."""
    ops: Counter = Counter()

    class Census(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            frame = inspect.currentframe()
            while frame is not None and frame.f_code.co_name not in HOST_COMPUTED:
                frame = frame.f_back
            if frame is not None:
                ops[frame.f_code.co_name] += 1
            return func(*args, **(kwargs or {}))

    with torch.no_grad(), Census():
        hidden = last_hidden_states(model.vlm, batch)
    return hidden, ops


@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_the_loaders_rope_positions_and_vision_indices_are_the_models_own_and_spare_it_computing_them(setup, packing):
    """trainer.host_inputs: the loader computes the rope positions, the vision tower's rotary positions, windows and
    segments (and a packed row's sample boundaries) with transformers' functions on the host; the model then
    computes none of them (the device reads they cost), and its hidden states are bit-equal to those it gives
    computing them itself."""
    model, processor, tokens, settings, samples = setup
    settings = dataclasses.replace(settings, packing=packing)
    batch = build_batch(samples[:3], StageConfig("understanding", 1), True, 0, processor, tokens, settings,
                        view_sizes=model.view_sizes(), vision=model.vision_geometry())
    assert {"position_ids", *HOST_INPUT_KEYS[:8]} <= batch.keys()
    assert (set(HOST_INPUT_KEYS[8:]) <= batch.keys()) == packing
    bare = without_host_inputs(batch)
    assert ("position_ids" in bare) == packing  # a packed row needs its text positions to find its samples
    with text_attention(model, TEXT_ATTENTION if packing else "sdpa"):
        hidden, ops = hidden_and_ops_of(model, batch)
        own, own_ops = hidden_and_ops_of(model, bare)
    assert not ops, ops
    assert own_ops["get_vision_window_index"] > 0 and own_ops["get_placeholder_mask"] > 0
    assert packing or own_ops["get_rope_index"] > 0
    assert torch.equal(hidden, own)
    with text_attention(model, TEXT_ATTENTION if packing else "sdpa"):
        grads = [named_gradients(model, b) for b in (batch, bare)]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    assert all(torch.equal(grads[0][name], grads[1][name]) for name in grads[0])


def named_gradients(model, batch: dict) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(batch)["loss"].backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_global_batch_sets_gradient_accumulation_for_the_number_of_gpus():
    from trainer.settings import grad_accum_for

    assert grad_accum_for(TrainConfig(batch_size=2, grad_accum=3), 4) == 3  # no global_batch: as configured
    assert [grad_accum_for(TrainConfig(batch_size=2, global_batch=8), n) for n in (1, 2, 4)] == [4, 2, 1]
    assert grad_accum_for(TrainConfig(batch_size=1, global_batch=8), 8) == 1
    with pytest.raises(ValueError, match="global_batch=8 is not a multiple of train.batch_size=2 x 8"):
        grad_accum_for(TrainConfig(batch_size=2, global_batch=8), 8)
