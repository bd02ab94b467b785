import dataclasses
import re
import types
import typing

import pytest

from covt.config import REFERENCE_FLAGS, ConfigError, config_keys, load_config, reference_markdown


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_unknown_top_level_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="datta"):
        load_config(write(tmp_path, "datta: {path: x}\n"))


def test_unknown_nested_key_is_named_with_its_section(tmp_path):
    with pytest.raises(ConfigError, match=r"cache\.shard_sise"):
        load_config(write(tmp_path, "cache: {shard_sise: 3}\n"))


def test_a_mistyped_key_suggests_the_closest_known_one(tmp_path):
    with pytest.raises(ConfigError, match=r"cache\.shard_sise; did you mean cache\.shard_size\?"):
        load_config(write(tmp_path, "cache: {shard_sise: 3}\n"))
    with pytest.raises(ConfigError, match=r"did you mean train\.adam_beta2\?"):
        load_config(None, ["train.adam_beta_2=0.95"])
    with pytest.raises(ConfigError) as far:
        load_config(None, ["train.zzz=1"])
    assert "did you mean" not in str(far.value)


def test_an_override_named_like_a_reference_flag_is_answered_with_its_key(tmp_path):
    """Users of the reference's run.sh (Hugging Face TrainingArguments' names) type its flags: the error names the
    key that sets the same thing here, wherever the flag was typed; every such key is one of this config's."""
    with pytest.raises(ConfigError, match=r"train\.learning_rate; did you mean train\.lr\? \(the reference's "
                                          r"--learning_rate, scripts/run\.sh 63\)"):
        load_config(None, ["train.learning_rate=1e-4"])
    with pytest.raises(ConfigError, match=r"did you mean train\.grad_accum\?"):
        load_config(None, ["gradient_accumulation_steps=2"])
    with pytest.raises(ConfigError, match=r"train\.lora\.lora_rank; did you mean train\.lora\.r\?"):
        load_config(write(tmp_path, "train: {lora: {lora_rank: 8}}\n"))
    keys = [key for key, *_ in config_keys()]
    for flag, (_, key) in REFERENCE_FLAGS.items():
        assert any(k == key or k.startswith(key + ".") for k in keys), (flag, key)
    assert reference_markdown().count("| `--") == len(REFERENCE_FLAGS)


def test_adam_betas_and_epsilon_reach_the_optimizer():
    import torch

    from trainer.optim import make_optimizer

    t = load_config(None, ["train.adam_beta1=0.8", "train.adam_beta2=0.95", "train.adam_epsilon=1e-6"]).train
    group = make_optimizer(torch.nn.Linear(2, 2), t).param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6
    with pytest.raises(ConfigError, match=r"train\.adam_beta2"):
        load_config(None, ["train.adam_beta2=1.0"])


def test_fused_adamw_takes_the_multi_tensor_step():
    """train.optim=adamw_torch_fused: torch's fused AdamW, the same update as the reference's adamw_torch."""
    import torch

    from trainer.optim import make_optimizer

    torch.manual_seed(0)
    models = {name: torch.nn.Linear(8, 4) for name in ("adamw_torch", "adamw_torch_fused")}
    models["adamw_torch_fused"].load_state_dict(models["adamw_torch"].state_dict())
    start = models["adamw_torch"].weight.detach().clone()
    x = torch.randn(16, 8)
    for name, model in models.items():
        optimizer = make_optimizer(model, load_config(None, [f"train.optim={name}", "train.lr=1e-2"]).train)
        assert optimizer.defaults["fused"] is (True if name.endswith("fused") else None)
        for _ in range(3):
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    plain, fused = (m.weight.detach() for m in models.values())
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-7)
    assert (plain - start).abs().min() > 1e-3  # both moved
    with pytest.raises(ConfigError, match=r"train\.optim"):
        load_config(None, ["train.optim=sgd"])


def test_wrong_type_names_the_dotted_key(tmp_path):
    with pytest.raises(ConfigError, match=r"cache\.shard_size.*integer"):
        load_config(write(tmp_path, "cache: {shard_size: many}\n"))
    with pytest.raises(ConfigError, match=r"data\.on_bad_record"):
        load_config(write(tmp_path, "data: {on_bad_record: ignore}\n"))


def test_overrides_parse_yaml_values_into_typed_fields(tmp_path):
    cfg = load_config(write(tmp_path, "cache: {shard_size: 3}\n"),
                      ["cache.shard_size=5", "train.lr=1e-4", "anchors=[sam,pidinet]", "data.limit=2",
                       "cache.codecs.depth/features=fp8", "data.on_bad_record=error"])
    assert cfg.cache.shard_size == 5
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.anchors == ["sam", "pidinet"]
    assert cfg.data.limit == 2
    assert cfg.cache.codecs == {"depth/features": "fp8"}
    assert cfg.data.on_bad_record == "error"


def test_override_errors_name_the_key():
    with pytest.raises(ConfigError, match="not of the form"):
        load_config(None, ["cache.shard_size"])
    with pytest.raises(ConfigError, match=r"cache\.shard_size"):
        load_config(None, ["cache.shard_size=[1,2]"])
    with pytest.raises(ConfigError, match=r"cache\.nope"):
        load_config(None, ["cache.nope=1"])
    with pytest.raises(ConfigError, match="unknown anchor 'segment'"):
        load_config(None, ["anchors=[sam,segment]"])


def test_compile_mode_takes_the_modes_the_trainer_runs_and_names_the_key_otherwise():
    """train.compile_mode (Hugging Face's torch_compile_mode): torch.compile's modes without CUDA graphs; those with
    them are refused at load (train.cuda_graphs records whole micro-batches instead)."""
    assert load_config(None, ["train.compile_mode=max-autotune-no-cudagraphs"]).train.compile_mode == \
        "max-autotune-no-cudagraphs"
    assert load_config(None).train.compile_mode == "default"
    with pytest.raises(ConfigError, match=r"train\.compile_mode"):
        load_config(None, ["train.compile_mode=reduce-overhead"])


@pytest.mark.parametrize("compile_on", [False, True])
def test_compile_mode_without_compile_is_said_before_any_work(tmp_path, caplog, compile_on):
    """The trainer warns that train.compile_mode does nothing without train.compile, before it reads anything (the
    run here stops at its empty schedule); with train.compile on it says nothing."""
    import logging

    from trainer.schedule import ScheduleError
    from trainer.train import train

    cfg = load_config(None, [f"train.output_dir={tmp_path / 'out'}", f"cache.dir={tmp_path / 'none'}",
                             "train.device=cpu", "train.compile_mode=max-autotune-no-cudagraphs",
                             f"train.compile={str(compile_on).lower()}"])
    with caplog.at_level(logging.WARNING, logger="trainer.train"), pytest.raises(ScheduleError):
        train(cfg)
    warning = "train.compile_mode=max-autotune-no-cudagraphs has no effect"
    said = [r for r in caplog.records if warning in r.getMessage()]
    assert len(said) == (0 if compile_on else 1)


def test_bundled_tiny_config_loads(repo_root):
    cfg = load_config(repo_root / "configs" / "tiny.yaml")
    assert cfg.data.path.endswith("conversations.json")
    assert set(cfg.anchors) <= {"sam", "depth", "dino", "pidinet", "siglip", "metaclip"}


@pytest.mark.parametrize("override, key, shown", [
    ("train.grad_accum=0", "train.grad_accum", ">= 1"),
    ("train.batch_size=-1", "train.batch_size", ">= 1"),
    ("train.lr=-1", "train.lr", "> 0"),
    ("cache.shard_size=0", "cache.shard_size", ">= 1"),
    ("train.lora.dropout=1", "train.lora.dropout", "in [0, 1)"),
    ("train.plain_answer_fraction=.nan", "train.plain_answer_fraction", "in [0, 1]"),
    ("train.loss_weights={depth: -2}", "train.loss_weights.depth", ">= 0"),
    ("train.stages=[{name: understanding, steps: 0}]", r"train.stages\[0\].steps", ">= 1"),
    ("train.max_nonfinite_steps=0", "train.max_nonfinite_steps", ">= 1"),
])
def test_a_number_out_of_range_is_refused_at_load_naming_the_key(override, key, shown):
    with pytest.raises(ConfigError, match=rf"^{key}: .* is out of range \(must be {re.escape(shown)}\)"):
        load_config(None, [override])


def _numeric_patterns(tp, pattern=""):
    """RANGES patterns of every int/float field reachable from the dataclass ``tp``."""
    for f in dataclasses.fields(tp):
        yield from _patterns_of(typing.get_type_hints(tp)[f.name], f"{pattern}{'.' if pattern else ''}{f.name}")


def _patterns_of(hint, pattern):
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        yield from _numeric_patterns(hint, pattern)
    elif origin is list:
        yield from _patterns_of(args[0], f"{pattern}[i]")
    elif origin is dict:
        yield from _patterns_of(args[1], f"{pattern}.NAME")
    elif origin in (typing.Union, types.UnionType):
        for a in args:
            yield from _patterns_of(a, pattern)
    elif hint in (int, float):
        yield pattern


def test_every_numeric_field_has_a_range_and_every_range_a_field(repo_root):
    from covt.config import RANGES, Config

    fields = set(_numeric_patterns(Config))
    assert fields - set(RANGES) == set(), "add these to covt.config.RANGES"
    assert set(RANGES) - fields == set(), "RANGES names fields that do not exist"
    for name in ("tiny.yaml", "covt_7b_all.yaml", "covt_7b_sam_depth_dino.yaml"):
        load_config(repo_root / "configs" / name)  # the shipped configs are in range
