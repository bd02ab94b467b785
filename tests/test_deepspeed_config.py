"""A DeepSpeed JSON written the Hugging Face way ("auto" values) gets the config's numbers."""
import json

import pytest

from covt.config import load_config
from trainer.deepspeed_config import DeepSpeedConfigError, auto_keys, resolve_deepspeed_config

# transformers' docs/source/en/deepspeed.md ZeRO-3 example, as users copy it
HF_ZERO3 = """
{
  "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
           "hysteresis": 2, "min_loss_scale": 1},
  "bf16": {"enabled": "auto"},
  "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
  "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": "auto", "warmup_min_lr": "auto",
                                                      "warmup_max_lr": "auto", "warmup_num_steps": "auto"}},
  "zero_optimization": {
    "stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": true},
    "overlap_comm": true, "contiguous_gradients": true, "sub_group_size": 1e9,
    "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
    "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
    "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": true
  },
  "gradient_accumulation_steps": "auto",
  "gradient_clipping": "auto",
  "steps_per_print": 2000,
  "train_batch_size": "auto",
  "train_micro_batch_size_per_gpu": "auto",
  "wall_clock_breakdown": false
}
"""


def train_config(*overrides):
    return load_config(None, ["train.batch_size=2", "train.grad_accum=4", "train.lr=2e-5", "train.weight_decay=0.1",
                              "train.adam_beta2=0.95", "train.warmup_ratio=0.1", *overrides]).train


def test_a_hugging_face_style_json_gets_numbers_from_the_config():
    ds = resolve_deepspeed_config(json.loads(HF_ZERO3), train_config(), world=8, bf16=True, max_grad_norm=1.0,
                                  hidden_size=64, run_steps=100)
    assert list(auto_keys(ds)) == []
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == \
        (2, 4, 64)
    assert ds["gradient_clipping"] == 1.0
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["optimizer"]["params"] == {"lr": 2e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}
    assert ds["scheduler"]["params"] == {"total_num_steps": 100, "warmup_min_lr": 0, "warmup_max_lr": 2e-5,
                                         "warmup_num_steps": 10}
    zero = ds["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (64 * 64, int(0.9 * 64 * 64), 640)
    assert zero["stage3_max_live_parameters"] == 1e9  # numbers the file states are kept


def test_the_shipped_jsons_resolve_unchanged_but_for_the_batch_numbers(repo_root):
    for name in ("zero2", "zero3"):
        raw = json.loads((repo_root / "configs/deepspeed" / f"{name}.json").read_text())
        ds = resolve_deepspeed_config(raw, train_config(), world=1, bf16=False, max_grad_norm=1.0, hidden_size=64,
                                      run_steps=10)
        assert ds["train_batch_size"] == 8 and ds["bf16"] == {"enabled": False}
        assert ds["zero_optimization"] == raw["zero_optimization"]


def test_a_stated_number_that_disagrees_with_the_config_names_both_keys():
    raw = {"train_micro_batch_size_per_gpu": 4}
    with pytest.raises(DeepSpeedConfigError, match=r"train_micro_batch_size_per_gpu is 4 but train.batch_size is 2"):
        resolve_deepspeed_config(raw, train_config(), 1, False, 1.0, 64, 10)
    with pytest.raises(DeepSpeedConfigError, match=r"optimizer.params.lr"):
        resolve_deepspeed_config({"optimizer": {"params": {"lr": 1e-3}}}, train_config(), 1, False, 1.0, 64, 10)


def test_an_auto_nothing_fills_is_named():
    with pytest.raises(DeepSpeedConfigError, match=r"zero_optimization.sub_group_size = \"auto\""):
        resolve_deepspeed_config({"zero_optimization": {"sub_group_size": "auto"}}, train_config(), 1, False, 1.0,
                                 64, 10)


def test_deepspeed_accepts_the_resolved_hugging_face_json():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.config import DeepSpeedConfig

    ds = resolve_deepspeed_config(json.loads(HF_ZERO3), train_config(), world=1, bf16=False, max_grad_norm=1.0,
                                  hidden_size=64, run_steps=100)
    parsed = DeepSpeedConfig(ds)
    assert (parsed.train_batch_size, parsed.gradient_accumulation_steps, parsed.gradient_clipping) == (8, 4, 1.0)
    assert parsed.zero_config.reduce_bucket_size == 64 * 64
