"""See the visual thoughts: decode them with the trained heads and draw them beside the anchors' own outputs.

``python -m trainer generate ... --thoughts out.png``. Steps (:func:`draw_thoughts`):

1. the anchors the heads need run on the image (precompute's loaders, with the checkpoints of
   ``--config``'s ``precompute.checkpoints``, on the views ``precompute.views`` gives them: SAM's
   image embedding and its automatic masks, Depth Anything's layer features and depth, DINOv2,
   PIDINet, SigLIP/MetaCLIP), giving the same arrays
   the cache holds for a training image;
2. the hidden states of the thought tokens (:func:`thought_states`): the last-layer states at the
   pad positions of each visual thought the model generated, read in one forward pass over prompt +
   answer (causal attention makes them the states generation computed). An anchor whose thought the
   model did not emit (a model that answers plainly, or the tiny random default) gets them from
   stage 2's training text instead (the model asked "What is the ... of the image?" with the thoughts
   as the answer, on the square view of ``model.image_size``); the picture names the source of each;
3. each head's public ``decode(thoughts, targets, views)`` (trainer.heads), then one PNG: the image
   and the answer, then per anchor the head's decoding beside the anchor's own output.

Only the CLI (inference/cli.py) imports this module: it imports ``precompute`` (the anchor models), which
``trainer`` never does (the phases share only ``covt`` and ``shards``).
"""
from __future__ import annotations

import tempfile
import textwrap
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from covt.config import Config, load_config
from covt.images import square_view
from inference.generate import Generated, model_thought_tokens, open_image
from precompute.anchors import load_anchor
from precompute.views import make_view, view_key
from shards.inspect import pca_image
from trainer.batch import encode_text
from trainer.formats import format_sample
from trainer.heads.base import head_views
from trainer.loading import HEADS_JSON, is_reference_layout, load_covt_heads, load_reference_heads, read_reference_heads
from trainer.model import last_hidden_states
from trainer.tokens import thought_positions

MASK_COLOURS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
                         [145, 30, 180], [70, 240, 240], [240, 50, 230]]) / 255.0


# ----------------------------------------------------------------------------- the anchors on the image
@torch.no_grad()
def anchor_outputs(cfg: Config, anchors: list[str], image: Image.Image,
                   device: torch.device) -> dict[str, dict[str, torch.Tensor]]:
    """anchor -> its target arrays for ``image`` (batch of one), computed as precompute computes them."""
    pre = cfg.precompute
    outputs = {}
    for name in anchors:
        model = load_anchor(name, pre, device)
        view = make_view(image, view_key(name, model.input_size, pre.views))  # the view precompute gives it
        # copies: the view and the anchors' arrays may be read-only NumPy views, which torch.from_numpy warns about
        views = torch.tensor(view[None]).to(device)
        outputs[name] = {k: torch.tensor(np.asarray(v)) for k, v in model.compute(views).items()}
        del model
    return outputs


# ----------------------------------------------------------------------------- the thought states
def full_sequence_inputs(generated: Generated) -> dict[str, torch.Tensor]:
    """Model inputs for prompt + generated answer (row 0), to re-read the answer's hidden states."""
    sequence = generated.sequences[:1]
    inputs = {**generated.inputs, "input_ids": sequence, "attention_mask": torch.ones_like(sequence)}
    if "mm_token_type_ids" in inputs:  # the answer is text: type 0
        types = inputs["mm_token_type_ids"][:1]
        inputs["mm_token_type_ids"] = torch.nn.functional.pad(types, (0, sequence.shape[1] - types.shape[1]))
    return inputs


def stage2_inputs(processor, image: Image.Image, question: str, anchors: list[str], image_size: int) -> dict:
    """Model inputs of stage 2's training text for ``anchors`` (the generation question, the thoughts as the
    answer), on the square view training used (``model.image_size``)."""
    conversation = [{"from": "human", "value": "<image>\n" + question}, {"from": "gpt", "value": "-"}]
    view = Image.fromarray(square_view(image, image_size))
    row = encode_text(format_sample(conversation, "generation", anchors), view, processor)
    return {k: v if k in ("pixel_values", "image_grid_thw") else v[None] for k, v in row.items() if k != "labels"}


@torch.no_grad()
def thought_states(vlm, processor, generated: Generated, image: Image.Image, anchors: list[str],
                   image_size: int) -> dict[str, tuple[torch.Tensor, str]]:
    """anchor -> (its thought tokens' last-layer hidden states (1, N, H): what the heads were trained on, where
    they come from)."""
    tokens = model_thought_tokens(processor)
    found: dict[str, tuple[torch.Tensor, str]] = {}
    spans = [(a, p) for a, p in generated.answers[0].thought_spans if a in anchors]
    if spans:
        states = last_hidden_states(vlm, {k: v.to(vlm.device) for k, v in full_sequence_inputs(generated).items()})
        for anchor, positions in spans:
            found.setdefault(anchor, (states[:, positions], "generated"))
    missing = [a for a in anchors if a not in found]
    if missing:
        inputs = stage2_inputs(processor, image, generated.answers[0].question, missing, image_size)
        states = last_hidden_states(vlm, {k: v.to(vlm.device) for k, v in inputs.items()})
        ids = inputs["input_ids"][0].tolist()
        for anchor, positions in thought_positions(ids, tokens):
            found.setdefault(anchor, (states[:, positions], "stage-2 prompt (not generated)"))
    return found


# ----------------------------------------------------------------------------- the picture
def draw_thoughts(model_dir: str, config_path: str, vlm, processor, generated: Generated, out: str) -> Path:
    """Decode the first answer's visual thoughts and write the PNG ``out``; ``config_path`` names the anchors'
    checkpoints (precompute.checkpoints) and the view training used (model.image_size)."""
    cfg = load_config(config_path)
    final = Path(model_dir)
    with tempfile.TemporaryDirectory(prefix="covt-decoders-") as decoders:
        heads = trained_heads(final, cfg, Path(decoders), vlm.device).to(vlm.device)
        return decode_and_draw(cfg, heads, vlm, processor, generated, out, final)


def trained_heads(final: Path, cfg: Config, decoders: Path, device: torch.device) -> torch.nn.ModuleDict:
    """The heads of ``final``: ours (covt_heads.*), or a released CoVT checkpoint's, read from its model file
    under the reference's names for ``--config``'s anchors, sized from the tensors and from those anchors,
    whose frozen decoders (SAM's mask decoder, PIDINet's first stage) are exported into ``decoders``."""
    if (final / HEADS_JSON).is_file():
        return load_covt_heads(final)
    if not is_reference_layout(final):
        raise FileNotFoundError(f"--thoughts: {final} has no {HEADS_JSON} and is not a released CoVT checkpoint "
                                "(architecture CoVTForConditionalGeneration); give a trained CoVT folder "
                                "(output_dir/final), not a base or merged model")
    tensors = read_reference_heads(final)
    anchors = [a for a in cfg.anchors if a in tensors]
    if not anchors:
        raise ValueError(f"--thoughts: {final} holds heads for {sorted(tensors)}, none of --config's anchors "
                         f"{cfg.anchors}")
    dims = {}
    for name in anchors:
        model = load_anchor(name, cfg.precompute, device)
        dims[name] = model.dims()
        model.export_decoders(decoders)
        del model
    return load_reference_heads(tensors, anchors, dims, decoders)


def decode_and_draw(cfg: Config, heads: torch.nn.ModuleDict, vlm, processor, generated: Generated, out: str,
                    final: Path) -> Path:
    """Decode the first answer's visual thoughts with ``heads`` and draw them beside the anchors' outputs."""
    anchors = list(heads.keys())
    if not anchors:
        raise ValueError(f"--thoughts: {final} has no visual-thought heads (trained with train.thoughts: false)")
    answer = generated.answers[0]
    image = open_image(answer.image)
    states = thought_states(vlm, processor, generated, image, anchors, cfg.model.image_size)
    targets = anchor_outputs(cfg, anchors, image, vlm.device)
    rows = []
    for anchor in anchors:
        head = heads[anchor]
        hidden, source = states[anchor]
        views = head_views([image], head.view_size).to(vlm.device) if head.view_size else None
        with torch.no_grad():
            decoded = head.decode(hidden.float(), {k: v.to(vlm.device) for k, v in targets[anchor].items()}, views)
        rows.append((anchor, source, decoded.float().cpu(), {k: v.float() for k, v in targets[anchor].items()}))
    return write_picture(image, answer, rows, Path(out))


def _mask_overlay(image: Image.Image, masks: np.ndarray) -> np.ndarray:
    """``masks`` (K, h, w) bool drawn over the square view of ``image`` at the masks' size."""
    view = square_view(image, masks.shape[-1]).astype(np.float64) / 255.0
    for k, mask in enumerate(masks):
        view[mask] = 0.55 * view[mask] + 0.45 * MASK_COLOURS[k % len(MASK_COLOURS)]
    return view


def panels_of(anchor: str, image: Image.Image, decoded: torch.Tensor, target: dict[str, torch.Tensor]):
    """(head's title, draw, anchor's title, draw) for one anchor."""
    if anchor == "sam":
        predicted = (decoded[0].sigmoid() > 0.5).numpy()
        count = int(target["mask_count"].reshape(-1)[0])
        reference = target["masks"][0, :count].bool().numpy()
        return (f"{len(predicted)} masks the SAM tokens decode to",
                lambda ax: ax.imshow(_mask_overlay(image, predicted)),
                f"SAM's own masks ({count})", lambda ax: ax.imshow(_mask_overlay(image, reference)))
    if anchor in ("depth", "pidinet"):
        key, cmap, what = ("depth", "magma", "depth") if anchor == "depth" else ("edges", "inferno", "edge map")
        return (f"{what} reconstructed from the tokens", lambda ax: ax.imshow(decoded[0].numpy(), cmap=cmap),
                f"{anchor}'s own {what}", lambda ax: ax.imshow(target[key][0].numpy(), cmap=cmap))
    if anchor == "dino":
        own = target["features"][0].numpy()
        predicted, _ = pca_image(decoded[0].numpy(), (1, 5, 0), reference=own)
        reference, _ = pca_image(own, (1, 5, 0))
        return ("DINO features predicted (PCA of DINOv2's own)", lambda ax: ax.imshow(predicted),
                "DINOv2's own features (PCA)", lambda ax: ax.imshow(reference))
    predicted, reference = decoded.reshape(-1).numpy(), target["embedding"].reshape(-1).numpy()
    cosine = float(np.dot(predicted, reference) / max(np.linalg.norm(predicted) * np.linalg.norm(reference), 1e-12))
    bars = lambda v: lambda ax: ax.bar(np.arange(len(v)), v, width=1.0)  # noqa: E731
    return (f"{anchor} embedding predicted (cosine {cosine:.2f})", bars(predicted),
            f"{anchor}'s own embedding", bars(reference))


def printable(line: str) -> str:
    """``line`` with its control characters escaped (``\\x17``): a model's raw output may hold any of them."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in line)


def write_picture(image: Image.Image, answer, rows, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1 + len(rows), 2, figsize=(8.4, 4.0 * (1 + len(rows))), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([]), ax.set_yticks([])
    axes[0, 0].imshow(image)
    axes[0, 0].set_title(Path(answer.image).name, fontsize=9)
    axes[0, 1].axis("off")
    text = f"Q: {answer.question}\n\nchain: {answer.chain}\n\nanswer: {answer.answer}"
    wrapped = "\n".join(textwrap.fill(printable(line), 48) for line in text.splitlines())
    axes[0, 1].text(0, 1, wrapped[:1200], va="top", fontsize=8, family="monospace", transform=axes[0, 1].transAxes)
    for (anchor, source, decoded, target), (left, right) in zip(rows, axes[1:]):
        head_title, draw_head, anchor_title, draw_anchor = panels_of(anchor, image, decoded, target)
        draw_head(left)
        left.set_title(f"{head_title}\n[{anchor} thoughts: {source}]", fontsize=9)
        draw_anchor(right)
        right.set_title(anchor_title, fontsize=9)
    fig.suptitle("visual thoughts decoded by the trained heads (left) and the anchors' own outputs (right)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out

