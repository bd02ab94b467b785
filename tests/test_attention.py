"""The vision tower's varlen attention computes what transformers' sdpa path computes."""
from __future__ import annotations

import pytest
import torch

from trainer.tiny_model import build_processor, build_tokenizer, tiny_config
from trainer.vision_attention import VISION_ATTENTION, use_varlen_vision_attention, vision_varlen_attention


def _tiny_vlm():
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    processor = build_processor(build_tokenizer(), image_size=112)
    config = tiny_config(processor.tokenizer)
    config._attn_implementation = "sdpa"
    return AutoModelForImageTextToText.from_config(config, dtype=torch.float32).eval(), config


def test_vision_tower_output_and_gradient_equal_the_sdpa_path(monkeypatch):
    import trainer.vision_attention as attention

    vlm, config = _tiny_vlm()
    patch = config.vision_config.patch_size
    grid = torch.tensor([[1, 8, 8], [1, 12, 8]])  # two images of different sizes: unequal segments
    pixels = torch.randn(int(grid.prod(-1).sum()), 3 * 2 * patch * patch, requires_grad=True)

    def run():
        pixels.grad = None
        out = vlm.model.visual(pixels, grid_thw=grid).pooler_output
        out.square().sum().backward()
        return out.detach(), pixels.grad.clone()

    expected, expected_grad = run()
    use_varlen_vision_attention(vlm)
    assert vlm.model.visual.config._attn_implementation == VISION_ATTENTION
    assert vlm.model.language_model.config._attn_implementation == "sdpa"
    calls = []
    per_segment = attention.per_segment
    monkeypatch.setattr(attention, "per_segment", lambda *a: calls.append(1) or per_segment(*a))
    got, got_grad = run()
    assert calls, "the vision tower did not call the registered attention"
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_segments_do_not_attend_to_each_other():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 10, 4) for _ in range(3))
    cu = torch.tensor([0, 4, 10])
    out, _ = vision_varlen_attention(None, q, k, v, scaling=0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    v2 = v.clone()
    v2[:, :, 4:] += 1.0  # changing the second segment leaves the first unchanged
    out2, _ = vision_varlen_attention(None, q, k, v2, scaling=0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    assert out.shape == (1, 10, 2, 4)
    torch.testing.assert_close(out2[:, :4], out[:, :4])
    assert not torch.allclose(out2[:, 4:], out[:, 4:])


def test_packed_text_attention_is_causal_within_each_sample_and_never_across():
    """trainer.text_attention on a packed row of 3 samples (grouped-query heads, as the tiny and 7B models have)
    against causal attention of each sample alone; the boundaries are read once per positions tensor."""
    from trainer.text_attention import SampleBoundaries, packed_text_attention

    torch.manual_seed(0)
    lengths = [5, 1, 7]
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    q, k, v = torch.randn(1, 4, 13, 8), torch.randn(1, 2, 13, 8), torch.randn(1, 2, 13, 8)
    out, _ = packed_text_attention(None, q, k, v, None, scaling=0.5, position_ids=positions)
    expected = [torch.nn.functional.scaled_dot_product_attention(
        qs, ks.repeat_interleave(2, dim=1), vs.repeat_interleave(2, dim=1), is_causal=True, scale=0.5)
        for qs, ks, vs in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))]
    torch.testing.assert_close(out, torch.cat(expected, dim=2).transpose(1, 2), rtol=1e-6, atol=1e-6)

    boundaries = SampleBoundaries()
    cu, longest = boundaries(positions)
    assert cu.tolist() == [0, 5, 6, 13] and longest == 7
    assert boundaries(positions)[0] is cu  # the same tensor (every layer of one pass): not read again
    assert boundaries(positions.clone())[0] is not cu


def test_causal_varlen_groups_heads_itself_where_the_kernel_cannot(monkeypatch):
    """torch 2.11's varlen_attn has no enable_gqa (it failed on the device): the key/value heads are repeated
    instead, and the result equals grouped-query attention per sample."""
    import trainer.text_attention as text_attention
    from trainer.vision_attention import per_segment

    seen = {}

    def varlen_without_gqa(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        seen.update(kv_heads=k.shape[1], window=window_size)
        assert k.shape[1] == q.shape[1], "this kernel cannot group heads"
        return per_segment(q, k, v, cu_q, scale, causal=window_size == (-1, 0))

    monkeypatch.setattr(text_attention, "varlen_kernel", lambda: varlen_without_gqa)
    torch.manual_seed(0)
    q, k, v = torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    out = text_attention.causal_varlen(q, k, v, cu, 5, 0.3)
    assert seen == {"kv_heads": 4, "window": (-1, 0)}
    torch.testing.assert_close(out, per_segment(q, k, v, cu, 0.3, causal=True))


@pytest.mark.parametrize("causal", [False, True])
def test_block_diagonal_mask_attends_as_per_segment_calls_do(causal):
    """What a CUDA graph's recording uses instead of per-segment calls (it cannot read the lengths to the host):
    the same attention, grouped-query heads and all, from one masked call."""
    from trainer.vision_attention import block_diagonal, per_segment

    torch.manual_seed(0)
    q, k, v = torch.randn(11, 4, 8), torch.randn(11, 2, 8), torch.randn(11, 2, 8)
    cu = torch.tensor([0, 3, 4, 11], dtype=torch.int32)
    torch.testing.assert_close(block_diagonal(q, k, v, cu, 0.3, causal), per_segment(q, k, v, cu, 0.3, causal))
