"""The embedded default's base model: a tiny random-weight Qwen2.5-VL with a locally built tokenizer.

Nothing can be downloaded where this project is built, so the tiny config trains a
real ``Qwen2_5_VLForConditionalGeneration`` of toy size. The folder it writes is a
standard Hugging Face Qwen2.5-VL folder (config, safetensors weights, tokenizer,
image/video processor, chat template) that loads with plain
``AutoProcessor.from_pretrained`` and ``Qwen2_5_VLForConditionalGeneration.from_pretrained``,
exactly like ``Qwen/Qwen2.5-VL-7B-Instruct`` does.

The tokenizer is a byte-level BPE (Qwen2's pre-tokenizer and decoder) trained on the
bundled conversations plus some fixed English text, with Qwen's special tokens and a
chat template that renders messages the way Qwen2.5-VL's does.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CONVERSATIONS = REPO_ROOT / "data" / "sample" / "conversations.json"

# Qwen2.5-VL's special tokens, in Qwen's order (ids follow the BPE vocabulary).
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Renders like Qwen2.5-VL-Instruct's template: a default system turn, <|im_start|>role\n
# ... <|im_end|>\n per message, images as <|vision_start|><|image_pad|><|vision_end|>.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set counts = namespace(image=0, video=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "{% set counts.image = counts.image + 1 %}"
    "{% if add_vision_id %}Picture {{ counts.image }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' or 'video' in part %}"
    "{% set counts.video = counts.video + 1 %}"
    "{% if add_vision_id %}Video {{ counts.video }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in part %}"
    "{{ part['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Fixed English text so common words get their own merges (the prompt phrases of the
# four CoVT stage formats included).
_ENGLISH_TEXT = """
You are a helpful assistant. Describe the image in detail. What is shown in the picture?
What is the segmentation of the image? What is the depth map of the image? What is the edge map
of the image? What are the DINO features of the image? What is the SigLIP embedding of the image?
What is the MetaCLIP embedding of the image? <think> Because the segmentation of the image is
this, and the depth map of the image is that, the answer follows. </think> <answer> The answer is
yes. </answer> The objects in the scene are arranged from left to right. The sky is clear and the
light comes from the top of the frame. A person stands near a table with a cup of coffee on it.
How many objects are there? There are three objects. Which one is closer to the camera? The one
on the left is closer to the camera than the one on the right. The color of the wall is white,
the floor is brown and the window shows a blue sky. Answer the question with a single word or
phrase. Yes. No. Left. Right. Top. Bottom. Red, green, blue, yellow, black, white, gray.
One, two, three, four, five, six, seven, eight, nine, ten. 0 1 2 3 4 5 6 7 8 9.
"""


@dataclass(frozen=True)
class TinySize:
    """The sizes of a small Qwen2.5-VL: the embedded default's, or bench/learn's larger ones."""

    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    vision_hidden: int = 32
    vision_intermediate: int = 64
    vision_depth: int = 2
    vision_heads: int = 2

    def __post_init__(self):
        head_dim = self.hidden // self.heads
        if self.hidden % self.heads or head_dim % 2 or self.heads % self.kv_heads:
            raise ValueError(f"{self}: hidden must split into an even head_dim per head, kv_heads divide heads")


DEFAULT_SIZE = TinySize()


def mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL's (temporal, height, width) split of the rotary frequencies, scaled from 7B's [16, 24, 24]."""
    frequencies = head_dim // 2
    temporal = frequencies // 4
    height = (frequencies - temporal) // 2
    return [temporal, height, frequencies - temporal - height]


def _training_text(extra: list[str] = ()) -> list[str]:
    lines = [line for line in _ENGLISH_TEXT.strip().splitlines()] + list(extra)
    if SAMPLE_CONVERSATIONS.is_file():
        for record in json.loads(SAMPLE_CONVERSATIONS.read_text()):
            for turn in record.get("conversations", []):
                lines.append(str(turn.get("value", "")).replace("<image>", ""))
    return lines


def build_tokenizer(vocab_size: int = 3000, extra_text: list[str] = ()):
    """A Qwen2Tokenizer whose byte-level BPE is trained here (on ``extra_text`` too), with Qwen's special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    bpe.train_from_iterator(_training_text(extra_text), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=dict(model["vocab"]),
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        model_max_length=32768,
        split_special_tokens=False,
    )
    tokenizer.add_special_tokens({"extra_special_tokens": QWEN_SPECIAL_TOKENS})
    return tokenizer


def tiny_config(tokenizer, seed_vocab_multiple: int = 64, size: TinySize = DEFAULT_SIZE):
    from transformers import Qwen2_5_VLConfig

    # Like the real checkpoints, the embedding table has a few spare rows past the tokenizer.
    vocab = -(-len(tokenizer) // seed_vocab_multiple) * seed_vocab_multiple
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    text_config = dict(
        vocab_size=vocab,
        hidden_size=size.hidden,
        intermediate_size=size.intermediate,
        num_hidden_layers=size.layers,
        num_attention_heads=size.heads,
        num_key_value_heads=size.kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                         "mrope_section": mrope_section(size.hidden // size.heads)},
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        use_sliding_window=False,
    )
    vision_config = dict(
        depth=size.vision_depth,
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_intermediate,
        num_heads=size.vision_heads,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        tokens_per_second=2,
        window_size=112,
        out_hidden_size=size.hidden,
        fullatt_block_indexes=list(range(1, size.vision_depth, 2)),
    )
    return Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )


def build_processor(tokenizer, image_size: int = 112):
    """Qwen2.5-VL processor whose square ``image_size`` view is exactly one (image_size/14)^2 patch grid."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    factor = 28  # patch 14 x merge 2
    if image_size % factor:
        raise ValueError(f"image_size {image_size} must be a multiple of {factor} (patch 14 x spatial merge 2)")
    pixels = dict(min_pixels=56 * 56, max_pixels=image_size * image_size)
    image_processor = Qwen2VLImageProcessor(patch_size=14, temporal_patch_size=2, merge_size=2, **pixels)
    video_processor = Qwen2VLVideoProcessor(patch_size=14, temporal_patch_size=2, merge_size=2, **pixels)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )


def build_tiny_base_model(path: str | Path, seed: int = 0, image_size: int = 112, size: TinySize = DEFAULT_SIZE,
                          extra_text: list[str] = ()) -> Path:
    """Write a tiny random-weight Qwen2.5-VL folder at ``path`` (deterministic for its arguments); its tokenizer
    also learns the words of ``extra_text``."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from trainer.export import write_atomically

    path = Path(path)
    tokenizer = build_tokenizer(extra_text=extra_text)
    processor = build_processor(tokenizer, image_size)
    config = tiny_config(tokenizer, size=size)
    fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(seed)
        model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [config.text_config.eos_token_id, config.text_config.bos_token_id]
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    model.generation_config.do_sample = False
    def write(tmp: Path) -> None:  # an interrupted build never leaves a half folder
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)

    return write_atomically(path, write)


def ensure_base_model(model_cfg) -> Path:
    """The base model folder of ``model_cfg`` (a covt.config.ModelConfig), built first if it is the tiny default."""
    path = Path(model_cfg.path)
    if (path / "config.json").is_file():
        return path
    if model_cfg.build_tiny_if_missing:
        if path.exists() and any(path.iterdir()):
            raise FileExistsError(f"model.path {str(path)!r} exists but holds no config.json; not building the "
                                  "tiny model over it (remove it, or point model.path at a Qwen2.5-VL folder)")
        return build_tiny_base_model(path, seed=0, image_size=model_cfg.image_size)
    raise FileNotFoundError(
        f"model.path {str(path)!r}: no Hugging Face model folder there (config.json missing). "
        "It should be a Qwen2.5-VL folder such as a local copy of Qwen/Qwen2.5-VL-7B-Instruct "
        "(huggingface-cli download Qwen/Qwen2.5-VL-7B-Instruct --local-dir <path>), "
        "or set model.build_tiny_if_missing=true for the tiny random-weight default."
    )
