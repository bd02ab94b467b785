"""A global batch gives the same loss and gradients however it is cut into micro-batches.

The recipe's global batch is 8 samples; on 1 GPU it runs as one micro-batch of 8, on 4 GPUs as 4 x 2, on
8 GPUs as 8 x 1 (the reference). The loss is the mean over samples of (each sample's mean token loss +
its anchor losses), so every cut must give the same number and the same gradients.
"""
import shutil

import pytest
import torch
from test_heads import write_tiny_pidinet_stage1, write_tiny_sam_decoder

from covt.config import Config, ModelConfig, StageConfig, TrainConfig
from shards.reader import Cache
from trainer.batch import build_batch
from trainer.heads import build_heads
from trainer.model import CoVTModel, text_hidden_size
from trainer.settings import BatchSettings
from trainer.tiny_model import build_tiny_base_model
from trainer.tokens import add_thought_tokens

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


def loss_and_gradients(setup, micro: int, stage: StageConfig, step: int):
    model, processor, tokens, settings, samples = setup
    model.zero_grad(set_to_none=True)
    chunks = [samples[i:i + micro] for i in range(0, GLOBAL_BATCH, micro)]
    total = 0.0
    for chunk in chunks:
        batch = build_batch(chunk, stage, True, step, processor, tokens, settings, view_sizes=model.view_sizes())
        loss = model(batch, anchor_losses=True)["loss"] / len(chunks)  # gradient accumulation, or ranks' mean
        loss.backward()
        total += loss.item()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return total, grads


@pytest.mark.parametrize("stage,step", [("understanding", 0), ("efficient_reasoning", 3)])
def test_global_batch_cut_8x1_4x2_2x4_1x8_gives_one_loss_and_gradient(setup, stage, step):
    stage = StageConfig(stage, 1)
    loss_1, grads_1 = loss_and_gradients(setup, 1, stage, step)
    assert grads_1.abs().sum() > 0
    for micro in (2, 4, 8):
        loss, grads = loss_and_gradients(setup, micro, stage, step)
        assert loss == pytest.approx(loss_1, rel=1e-5), micro
        # fp32 summation order differs between cuts (measured ~3e-7); a wrong normalisation is off by percents
        assert float((grads - grads_1).norm() / grads_1.norm()) < 1e-5, micro
        assert float((grads - grads_1).abs().max()) < 1e-5 * float(grads_1.abs().max()), micro


def test_global_batch_sets_gradient_accumulation_for_the_number_of_gpus():
    from trainer.settings import grad_accum_for

    assert grad_accum_for(TrainConfig(batch_size=2, grad_accum=3), 4) == 3  # no global_batch: as configured
    assert [grad_accum_for(TrainConfig(batch_size=2, global_batch=8), n) for n in (1, 2, 4)] == [4, 2, 1]
    assert grad_accum_for(TrainConfig(batch_size=1, global_batch=8), 8) == 1
    with pytest.raises(ValueError, match="global_batch=8 is not a multiple of train.batch_size=2 x 8"):
        grad_accum_for(TrainConfig(batch_size=2, global_batch=8), 8)
