"""Released CoVT checkpoints load here, and ours export in their layout.

The reference's final merge (merge_lora_weights.py with utils.py's fp16 load) writes one folder: the
CoVTForConditionalGeneration weights in fp16 with the heads inside the model file under the reference's
attribute names (covt_qwen2_5_vl.py 969-997), the VLM's keys as transformers 4.50 wrote them. A folder laid
out so decodes its visual thoughts with ``generate --thoughts``; ``export --format reference`` writes one that
loads back.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import e2e_checkpoints
from safetensors.torch import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration

from covt.config import load_config
from inference.thoughts import trained_heads
from shards.reader import Cache
from trainer.export import export_final, load_processor, load_vlm
from trainer.heads import build_heads
from trainer.tiny_model import build_tiny_base_model
from trainer.tokens import add_thought_tokens

REPO = Path(__file__).resolve().parents[1]
ANCHORS = ["sam", "depth", "dino"]


@pytest.fixture(scope="module")
def parts(e2e_workdir, tmp_path_factory):
    """A tiny VLM folder with the thought tokens, and random heads sized like the shared tiny run's anchors."""
    root = tmp_path_factory.mktemp("released")
    base = build_tiny_base_model(root / "base", seed=0, image_size=112)
    processor, vlm = load_processor(base), load_vlm(base)
    add_thought_tokens(processor, vlm, seed=0)
    vlm.save_pretrained(root / "vlm")
    processor.save_pretrained(root / "vlm")
    torch.manual_seed(0)
    heads = build_heads(ANCHORS, vlm.config.text_config.hidden_size, Cache(e2e_workdir / "cache"))
    return root / "vlm", heads


def reference_names(heads) -> dict[str, torch.Tensor]:
    """The heads' tensors under the reference's attribute names, written out here (not trainer.export's map)."""
    names = {}
    for anchor, head in heads.items():
        if anchor == "depth":
            names.update({f"depth_token_generator.{k}": v for k, v in head.depth_token_generator.state_dict().items()})
            continue
        attend = head.attend
        names[f"{anchor}_projection.weight"] = attend.thought_projection.weight
        names[f"{anchor}_projection.bias"] = attend.thought_projection.bias
        names[f"{anchor}_query_vectors"] = attend.query_vectors
        names.update({f"{anchor}_cross_attention.{k}": v for k, v in attend.cross_attention.state_dict().items()})
    return {k: v.detach() for k, v in names.items()}


def write_released(vlm_dir: Path, heads, out: Path) -> Path:
    shutil.copytree(vlm_dir, out)
    tensors = {k: v.half() for k, v in load_file(out / "model.safetensors").items()}
    # transformers writes Qwen2.5-VL's keys as 4.50 did: visual.*, model.layers.*, lm_head
    assert any(k.startswith("visual.") for k in tensors) and "lm_head.weight" in tensors
    assert not any(k.startswith("model.language_model.") for k in tensors)
    tensors.update({k: v.half().contiguous() for k, v in reference_names(heads).items()})
    hidden = heads["sam"].hidden_size
    # heads the reference builds but these anchors never read
    tensors["SD_projection.weight"] = torch.zeros(8, hidden, dtype=torch.float16)
    tensors["depth_query_vectors"] = torch.zeros(3, 8, dtype=torch.float16)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config.pop("dtype", None)
    config.update(architectures=["CoVTForConditionalGeneration"], torch_dtype="float16")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def thoughts_config(e2e_workdir: Path, tmp_path: Path) -> Path:
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    config["anchors"] = ANCHORS
    config["precompute"]["checkpoints"] = e2e_checkpoints(e2e_workdir)  # the anchors the heads fit
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    return tmp_path / "config.yaml"


def assert_heads_hold(loaded, heads, dtype=torch.float16):
    assert list(loaded.keys()) == ANCHORS
    for anchor in ANCHORS:
        expected = heads[anchor].state_dict()
        got = loaded[anchor].state_dict()
        assert set(got) == set(expected)
        for key, value in expected.items():
            assert torch.equal(got[key], value.to(dtype).float()), (anchor, key)


def test_generate_thoughts_decodes_a_released_checkpoint(parts, e2e_workdir, tmp_path, run_trainer):
    from PIL import Image

    released = write_released(*parts, tmp_path / "CoVT-tiny")
    config = thoughts_config(e2e_workdir, tmp_path)
    with torch.no_grad():
        heads = trained_heads(released, load_config(config), tmp_path / "decoders", torch.device("cpu"))
    assert_heads_hold(heads, parts[1])
    out = tmp_path / "thoughts.png"
    proc = run_trainer(["generate", "--model", str(released), "--image", str(REPO / "data/sample/images/rocket.jpg"),
                        "--question", "What is shown in the image?", "--image-size", "112", "--max-new-tokens", "8",
                        "--config", str(config), "--thoughts", str(out)])
    assert f"thoughts drawn: {out}" in proc.stdout
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.shape == (4 * 360, 756, 3)  # the image, then sam, depth, dino
    assert picture.std() > 20


def test_a_folder_without_heads_is_named_as_such(parts, e2e_workdir, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a released CoVT checkpoint"):
        trained_heads(parts[0], load_config(thoughts_config(e2e_workdir, tmp_path)), tmp_path, torch.device("cpu"))


def test_export_in_the_reference_format_loads_back(parts, e2e_workdir, tmp_path, run_trainer):
    vlm_dir, heads = parts
    final = export_final(vlm_dir, heads, add_thought_tokens(load_processor(vlm_dir)), {}, tmp_path / "final")
    out = tmp_path / "reference"
    proc = run_trainer(["export", "--model", str(final), "--out", str(out), "--format", "reference"])
    assert f"exported {final}: {out}" in proc.stdout
    assert json.loads((out / "config.json").read_text())["architectures"] == ["CoVTForConditionalGeneration"]
    assert not (out / "covt_heads.json").exists()
    tensors = load_file(out / "model.safetensors")
    assert all(t.dtype == torch.float16 for t in tensors.values())
    expected = reference_names(heads)
    for key, value in expected.items():
        assert torch.equal(tensors[key], value.half()), key
    # plain transformers loads the VLM (the heads are extra keys), with the final folder's weights in fp16
    vlm = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
    ours = Qwen2_5_VLForConditionalGeneration.from_pretrained(final, dtype=torch.float32).state_dict()
    for key, value in vlm.state_dict().items():
        assert torch.equal(value, ours[key].half().float()), key
    assert load_processor(out).tokenizer.get_vocab() == load_processor(final).tokenizer.get_vocab()
    with torch.no_grad():
        loaded = trained_heads(out, load_config(thoughts_config(e2e_workdir, tmp_path)), tmp_path / "decoders",
                               torch.device("cpu"))
    assert_heads_hold(loaded, heads)


def test_a_sharded_released_checkpoint_loads_its_heads(parts, e2e_workdir, tmp_path):
    """Released 7B checkpoints are sharded (model-0000K-of-0000N.safetensors + index): the heads are found in any."""
    released = write_released(*parts, tmp_path / "CoVT-sharded")
    tensors = load_file(released / "model.safetensors")
    (released / "model.safetensors").unlink()
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: tensors[k] for k in names}, released / name, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}
    (released / "model.safetensors.index.json").write_text(json.dumps(index))
    with torch.no_grad():
        heads = trained_heads(released, load_config(thoughts_config(e2e_workdir, tmp_path)), tmp_path / "decoders",
                              torch.device("cpu"))
    assert_heads_hold(heads, parts[1])
