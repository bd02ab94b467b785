"""The tiny base model folder, the thought tokens, and CoVTModel's thoughts, losses and gradients."""
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

from covt.anchors import ANCHORS
from covt.config import Config, ModelConfig, StageConfig, TrainConfig
from shards.reader import Cache
from trainer.batch import build_batch
from trainer.heads import build_heads
from trainer.model import CoVTModel, text_hidden_size
from trainer.settings import BatchSettings
from trainer.tiny_model import build_tiny_base_model, ensure_base_model
from trainer.tokens import REASONING_TAGS, add_thought_tokens, thought_text, thought_token_strings

REAL_HEAD_ANCHORS = ["depth", "dino", "siglip"]  # real heads that need no exported decoder file
PROBE_ANCHOR = "pidinet"  # stands in for a head that asks for views


class ProbeHead(nn.Module):
    """Follows the AnchorHead call signature and records what it was given."""

    view_size = 40

    def __init__(self, hidden_size):
        super().__init__()
        self.hidden_size = hidden_size
        self.proj = nn.Linear(hidden_size, 1)
        self.calls = []

    def forward(self, thoughts, targets, views, *, per_row=False, compiled=False):
        self.calls.append((thoughts.detach().clone(), targets, views))
        if thoughts.shape[0] == 0:
            return self.proj.weight.sum() * 0.0 + thoughts.sum() * 0.0
        losses = (self.proj(thoughts).squeeze(-1) - 1.0).pow(2).mean(1)
        return losses if per_row else losses.mean()


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return build_tiny_base_model(tmp_path_factory.mktemp("model") / "base", seed=0, image_size=112)


@pytest.fixture(scope="module")
def cache(synthetic_cache):
    return Cache(synthetic_cache)


def config():
    anchors = REAL_HEAD_ANCHORS + [PROBE_ANCHOR]
    return Config(anchors=anchors, model=ModelConfig(image_size=112),
                  train=TrainConfig(max_length=1024, loss_weights={"dino": 0.5}))


def covt(base_dir, cache, peft=False, checkpointing=False):
    processor = AutoProcessor.from_pretrained(base_dir)
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir, dtype=torch.float32)
    tokens = add_thought_tokens(processor, vlm, seed=0)
    if checkpointing:
        vlm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    if peft:
        from peft import LoraConfig, get_peft_model

        vlm = get_peft_model(vlm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             trainable_token_indices={"embed_tokens": tokens.ids,
                                                                      "lm_head": tokens.ids}))
    hidden = text_hidden_size(vlm)
    heads = build_heads(REAL_HEAD_ANCHORS, hidden, cache)
    heads[PROBE_ANCHOR] = ProbeHead(hidden)
    cfg = config()
    model = CoVTModel(vlm, heads, tokens, cfg.train.loss_weights)
    return model, processor, tokens, cfg


def settings(cfg: Config) -> BatchSettings:
    return BatchSettings.from_config(cfg)


def samples(cache, n=3):
    return [cache.sample(i) for i in range(n)]


# ------------------------------------------------------------------------- tiny base folder
def test_tiny_folder_loads_with_plain_transformers_and_generates(base_dir):
    processor = AutoProcessor.from_pretrained(base_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir).eval()
    assert type(processor).__name__ == "Qwen2_5_VLProcessor"
    assert type(processor.tokenizer).__name__ == "Qwen2Tokenizer"
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                    "<|vision_start|><|image_pad|><|vision_end|>What is in the image?<|im_end|>\n"
                    "<|im_start|>assistant\n")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (112, 112, 3), dtype=np.uint8))
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 8, 8]]
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 1 and 0 < out.shape[1] - inputs["input_ids"].shape[1] <= 4


def test_tiny_tokenizer_is_byte_level_bpe_with_qwen_special_tokens(base_dir):
    tok = AutoProcessor.from_pretrained(base_dir).tokenizer
    text = "The cat sat on the mat. Ünïcödé 東京 42!"
    assert tok.decode(tok(text).input_ids) == text  # byte-level: any text round-trips
    assert len(tok("The person is wearing a white spacesuit").input_ids) < 10  # merges learned
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>"):
        assert tok.convert_tokens_to_ids(special) is not None
        assert tok(special, add_special_tokens=False).input_ids == [tok.convert_tokens_to_ids(special)]


def test_tiny_build_is_deterministic_for_a_seed(base_dir, tmp_path):
    again = build_tiny_base_model(tmp_path / "again", seed=0, image_size=112)
    other = build_tiny_base_model(tmp_path / "other", seed=1, image_size=112)

    def digest(p):
        return hashlib.sha256(p.read_bytes()).hexdigest()

    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert digest(again / name) == digest(base_dir / name), name
    assert digest(other / "model.safetensors") != digest(base_dir / "model.safetensors")


def test_missing_base_model_is_a_clear_error_unless_tiny_build_is_asked(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=r"nowhere.*Qwen2\.5-VL.*Qwen/Qwen2\.5-VL-7B-Instruct"):
        ensure_base_model(ModelConfig(path=str(missing), build_tiny_if_missing=False))
    assert not missing.exists()


def test_ensure_base_model_builds_the_tiny_model_once_and_never_over_other_files(tmp_path):
    cfg = ModelConfig(path=str(tmp_path / "base"), build_tiny_if_missing=True, image_size=112)
    built = ensure_base_model(cfg)
    stamp = (built / "model.safetensors").stat().st_mtime_ns
    assert ensure_base_model(cfg) == built and (built / "model.safetensors").stat().st_mtime_ns == stamp
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no config.json"):
        ensure_base_model(ModelConfig(path=str(other), build_tiny_if_missing=True, image_size=112))
    assert (other / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- thought tokens
def test_thought_tokens_are_added_once_as_special_tokens_with_rows_at_the_vocabulary_mean(base_dir, tmp_path):
    processor = AutoProcessor.from_pretrained(base_dir)
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(base_dir)
    vlm.resize_token_embeddings(len(processor.tokenizer))  # no spare rows: the new ids must grow the tables
    old_len = len(processor.tokenizer)
    tokens = add_thought_tokens(processor, vlm, seed=0)
    added = 2 + len(ANCHORS) + len(REASONING_TAGS)
    assert len(processor.tokenizer) == old_len + added
    assert sorted(tokens.ids) == list(range(old_len, old_len + added))
    for matrix in (vlm.get_input_embeddings().weight, vlm.get_output_embeddings().weight):
        assert matrix.shape[0] == len(processor.tokenizer)
        mean = matrix[:old_len].mean(0)
        new = matrix[tokens.ids]
        assert torch.allclose(new, mean.expand_as(new), atol=1e-3 * matrix[:old_len].std().item() * 6)
        assert not torch.equal(new[0], new[1])  # seeded noise tells them apart
    ids = processor.tokenizer(thought_text("sam"), add_special_tokens=False).input_ids
    assert ids == [tokens.start_id] + [tokens.pad_id["sam"]] * ANCHORS["sam"].tokens + [tokens.end_id]
    assert processor.tokenizer.decode(ids, skip_special_tokens=True) == ""
    # the reasoning tags are single tokens that survive skip_special_tokens (answers are parsed from them)
    tagged = "<think> x </think>\n<answer> y </answer>"
    tag_ids = processor.tokenizer(tagged, add_special_tokens=False).input_ids
    assert [i for i in tag_ids if i in tokens.tag_ids] == list(tokens.tag_ids)
    assert processor.tokenizer.decode(tag_ids, skip_special_tokens=True) == tagged

    # saved and reloaded (as after a stage-1 merge): same ids, trained rows untouched
    with torch.no_grad():
        vlm.get_input_embeddings().weight[tokens.pad_id["depth"]] = 7.0
    processor.save_pretrained(tmp_path)
    vlm.save_pretrained(tmp_path)
    processor2 = AutoProcessor.from_pretrained(tmp_path)
    vlm2 = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path)
    assert add_thought_tokens(processor2, vlm2, seed=5) == tokens
    assert (vlm2.get_input_embeddings().weight[tokens.pad_id["depth"]] == 7.0).all()
    assert set(thought_token_strings()) <= set(processor2.tokenizer.all_special_tokens)


# ---------------------------------------------------------------------------------- CoVTModel
def test_thoughts_are_the_last_hidden_states_at_each_anchors_pads(base_dir, cache):
    model, processor, tokens, cfg = covt(base_dir, cache)
    batch = build_batch(samples(cache), StageConfig("reasoning", 1), True, 0, processor, tokens, settings(cfg),
                        view_sizes=model.view_sizes())
    model.eval()
    with torch.no_grad():
        model(batch, anchor_losses=True)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw",
                                        "mm_token_type_ids") if k in batch}
        last = model.vlm.model(**inputs).last_hidden_state
    probe = model.heads[PROBE_ANCHOR]
    (thoughts, targets, views), = probe.calls
    part = batch["anchors"][PROBE_ANCHOR]
    assert thoughts.shape == (3, ANCHORS[PROBE_ANCHOR].tokens, text_hidden_size(model.vlm))
    assert torch.allclose(thoughts, last[part["rows"][:, None], part["positions"]], atol=1e-5)
    assert views.shape == (3, 3, ProbeHead.view_size, ProbeHead.view_size) and views.dtype == torch.uint8
    assert torch.equal(targets["edges"], part["targets"]["edges"])


def test_total_loss_is_text_plus_weighted_anchor_losses_and_gradients_reach_new_rows_and_heads(base_dir, cache):
    model, processor, tokens, cfg = covt(base_dir, cache)
    batch = build_batch(samples(cache), StageConfig("generation", 1), True, 0, processor, tokens, settings(cfg),
                        view_sizes=model.view_sizes())
    out = model(batch, anchor_losses=True)
    assert set(out) == {"loss", "text", *cfg.anchors}
    # generation: every sample carries every anchor's thoughts, so each anchor's loss counts in full
    expected = out["text"].item() + sum(out[a].item() * cfg.train.loss_weights.get(a, 1.0) for a in cfg.anchors)
    assert out["loss"].item() == pytest.approx(expected, rel=1e-5)
    out["loss"].backward()
    embed = model.vlm.get_input_embeddings().weight.grad
    lm_head = model.vlm.get_output_embeddings().weight.grad
    for anchor in cfg.anchors:
        assert embed[tokens.pad_id[anchor]].abs().sum() > 0, anchor
        assert lm_head[tokens.pad_id[anchor]].abs().sum() > 0, anchor  # the pads are generated in stage 2
    for name, head in model.heads.items():
        grads = [p.grad for p in head.parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), name


def test_text_loss_is_the_mean_over_samples_of_each_samples_token_mean(base_dir, cache):
    """At one sample it is transformers' own loss; at several, the mean of the per-sample losses (not a mean
    over the micro-batch's pooled tokens), so it does not depend on how a global batch is cut."""
    model, processor, tokens, cfg = covt(base_dir, cache)
    model.eval()
    batch = build_batch(samples(cache, 3), StageConfig("reasoning", 1), False, 0, processor, tokens, settings(cfg))
    singles = [build_batch([s], StageConfig("reasoning", 1), False, 0, processor, tokens, settings(cfg))
               for s in samples(cache, 3)]
    inputs = ("input_ids", "attention_mask", "labels", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    with torch.no_grad():
        library = [model.vlm(**{k: b[k] for k in inputs if k in b}).loss.item() for b in singles]
        ours = [model(b, anchor_losses=False)["text"].item() for b in singles]
        together = model(batch, anchor_losses=False)["text"].item()
    assert ours == pytest.approx(library, rel=1e-5)
    assert together == pytest.approx(sum(library) / 3, rel=1e-4)


def test_with_anchor_losses_off_only_the_text_loss_counts(base_dir, cache):
    model, processor, tokens, cfg = covt(base_dir, cache)
    batch = build_batch(samples(cache, 2), StageConfig("efficient_reasoning", 1), False, 9, processor, tokens,
                        settings(cfg))
    out = model(batch, anchor_losses=False)
    assert set(out) == {"loss", "text"} and out["loss"].item() == pytest.approx(out["text"].item())
    assert model.heads[PROBE_ANCHOR].calls == []


def test_peft_wrapped_vlm_with_gradient_checkpointing_trains_thoughts_and_heads(base_dir, cache):
    model, processor, tokens, cfg = covt(base_dir, cache, peft=True, checkpointing=True)
    model.train()
    assert model.vlm.get_base_model().is_activation_checkpointing
    batch = build_batch(samples(cache, 2), StageConfig("understanding", 1), True, 0, processor, tokens, settings(cfg),
                        view_sizes=model.view_sizes())
    out = model(batch, anchor_losses=True)
    out["loss"].backward()
    probe = model.heads[PROBE_ANCHOR]
    assert len(probe.calls) == 1 and probe.calls[0][0].shape[0] == 2
    assert probe.proj.weight.grad.abs().sum() > 0
    lora = [p for n, p in model.vlm.named_parameters() if "lora_" in n]
    assert lora and any(p.grad is not None and p.grad.abs().sum() > 0 for p in lora)
    token_rows = [p for n, p in model.vlm.named_parameters() if "trainable_tokens" in n and p.requires_grad]
    assert token_rows and any(p.grad is not None and p.grad.abs().sum() > 0 for p in token_rows)


def test_loss_weight_for_an_anchor_without_a_head_is_rejected(base_dir, cache):
    model, _, tokens, _ = covt(base_dir, cache)
    with pytest.raises(KeyError, match="loss_weights.*'sam'"):
        CoVTModel(model.vlm, model.heads, tokens, {"sam": 2.0})
