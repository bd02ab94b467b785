"""bench/bench_precompute.py on the CPU (--quick, tiny variants): it runs, and --points-per-side sets SAM's grid."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_quick_bench(tmp_path, *extra: str) -> tuple[dict, str]:
    """``bench_precompute.py --quick`` at a 4-point grid and batch 1 (plus ``extra``): its JSON and its output."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "bench/bench_precompute.py", "--quick", "--points-per-side", "4",
                           "--batch-sizes", "1", "--json", str(out), *extra], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_the_precompute_bench_runs_at_the_grid_asked(tmp_path):
    result, printed = run_quick_bench(tmp_path, "--point-batch-size", "5")
    assert result["sam_points_per_side"] == 4 and "4 points per side" in printed
    assert "5 prompts per decoder call" in printed
    assert "target at 4 points per side >= 10 images/s" in printed
    assert {"sam", "depth", "dino", "sam+depth+dino"} <= set(result["batches"]["1"])


def test_the_target_is_issue_19s_at_the_references_32_points():
    from bench.bench_precompute import target_images_per_s

    assert target_images_per_s(32) == 20.0 and target_images_per_s(16) == 10.0


def test_no_sam_details_times_the_anchors_only(tmp_path):
    result, printed = run_quick_bench(tmp_path, "--no-sam-details")
    row = result["batches"]["1"]
    assert "sam_details" not in row and row["sam+depth+dino"] > 0
    assert "sam encoder img/s" not in printed


def test_profile_reports_where_each_anchors_time_goes(tmp_path):
    result, printed = run_quick_bench(tmp_path, "--no-sam-details", "--profile")
    profiles = result["profiles"]
    assert set(profiles) == {"sam", "depth", "dino"}
    assert set(profiles["sam"]["parts_ms"]) == {"sam.embed", "sam.automatic_masks", "sam.to_host"}
    assert set(profiles["depth"]["parts_ms"]) == {"depth.compute"}
    for profile in profiles.values():
        assert all(v > 0 for v in profile["parts_ms"].values()) and profile["total_ms"] > 0
        assert len(profile["top"]) == 25 and all(row["ms"] >= 0 and row["calls"] > 0 for row in profile["top"])
    assert "--- profile of one sam.compute of 1 images" in printed
    assert "--- profile of one dino.compute of 1 images" in printed


def test_compiled_decoder_is_timed_beside_eager(tmp_path):
    result, printed = run_quick_bench(tmp_path, "--compile-decoder")
    variants = result["batches"]["1"]["sam_details"]["decoder_variants"]
    assert set(variants) == {"library_eager", "library_compiled"}
    assert all(v["s"] > 0 for v in variants.values())
    assert variants["library_compiled"]["candidates"] == variants["library_eager"]["candidates"] > 0
    assert variants["library_compiled"]["mask_iou_vs_first"] > 0.999
    assert "compiled decoder True" in printed and "sam mask generation, decoder library_compiled:" in printed


def test_decoder_attentions_are_timed_side_by_side(tmp_path):
    result, printed = run_quick_bench(tmp_path, "--no-sam-details", "--decoder-variants")
    variants = result["decoder_variants"]
    assert set(variants) == {"library_eager", "sdpa_eager", "folded_eager"}
    for name in ("sdpa_eager", "folded_eager"):
        assert variants[name]["candidates"] == variants["library_eager"]["candidates"] > 0
        assert variants[name]["mask_iou_vs_first"] > 0.999
    assert "SAM's mask generation alone" in printed and "decoder folded_eager:" in printed


def test_encoder_attentions_are_timed_side_by_side(tmp_path):
    result, printed = run_quick_bench(tmp_path, "--no-sam-details", "--encoder-variants")
    variants = result["encoder_variants"]
    assert {"encoder_library_s", "encoder_sdpa_bias_s", "encoder_sdpa_fold_s"} <= set(variants)
    assert variants["encoder_library_vs_library_rel_l2"] == 0 and variants["encoder_sdpa_fold_vs_library_rel_l2"] < 1e-4
    assert variants["encoder_sdpa_fold_unpadded_s"] > 0
    assert variants["encoder_sdpa_fold_unpadded_vs_library_rel_l2"] < 1e-4
    assert "SAM's image encoder alone" in printed and "encoder_sdpa_fold_s:" in printed


def test_decoder_variants_of_the_attentions_named_with_fused_masks(tmp_path):
    result, printed = run_quick_bench(tmp_path, "--no-sam-details", "--decoder-variants", "folded", "--fused-masks")
    variants = result["decoder_variants"]
    assert set(variants) == {"folded_eager", "folded_eager_fused"}
    assert variants["folded_eager_fused"]["candidates"] == variants["folded_eager"]["candidates"] > 0
    assert "fused masks True" in printed


def test_anchors_beside_sam_compute_every_anchor(tmp_path):
    """--anchor-streams times sam+depth+dino with depth and dino in a second thread (on a GPU, a stream of their own)
    beside SAM: each anchor computes once per call, SAM in the calling thread and the others in the second. With
    --compile-anchors dino, dino is timed eager and compiled first."""
    import threading

    import torch

    from bench.bench_precompute import build_anchors, photo_batch, seconds_beside_sam

    result, printed = run_quick_bench(tmp_path, "--no-sam-details", "--anchor-streams", "--compile-anchors", "dino")
    assert result["batches"]["1"]["sam+depth+dino, depth and dino beside sam"] > 0
    assert "beside sam (a second thread and stream)" in printed
    # --compile-anchors: dino timed eager and compiled side by side, the rows then run it compiled
    compiled = result["compiled_anchors"]["dino"]
    assert compiled["eager_images_per_s"] > 0 and compiled["compiled_images_per_s"] > 0
    assert compiled["features_rel_l2"] < 1e-5 and "dino compiled: " in printed
    assert compiled["features_eager_norm"] > 0 and "(eager norm " in printed  # what the relative drift is of
    anchors = build_anchors(torch.device("cpu"), True, "fp32", None)
    views = {n: photo_batch(a.input_size, 1, torch.device("cpu")) for n, a in anchors.items()}
    calls: dict[str, list[bool]] = {n: [] for n in anchors}
    for name, anchor in anchors.items():
        def compute(v, anchor=anchor, name=name):
            calls[name].append(threading.current_thread() is threading.main_thread())
            return type(anchor).compute(anchor, v)
        anchor.compute = compute
    assert seconds_beside_sam(anchors, views, torch.device("cpu"), warmup=1, iters=1) > 0
    assert calls == {"sam": [True, True], "depth": [False, False], "dino": [False, False]}
    # the second thread is shut down after timing (by its name, so other tests' threads do not count)
    assert not [t for t in threading.enumerate() if t.name.startswith("anchors-beside-sam")]


def test_decoder_variants_with_bf16_decoder_tokens(tmp_path):
    """--bf16-decoder-tokens times the decoder both ways (on the CPU the decoder is fp32, so the same candidates)."""
    result, printed = run_quick_bench(tmp_path, "--no-sam-details", "--decoder-variants", "folded",
                                      "--bf16-decoder-tokens")
    variants = result["decoder_variants"]
    assert set(variants) == {"folded_eager", "folded_eager_bf16_tokens"}
    assert variants["folded_eager_bf16_tokens"]["candidates"] == variants["folded_eager"]["candidates"] > 0
    assert "decoder tokens bf16" in printed


def test_decoder_variants_at_the_rows_settings_over_point_batch_sizes(tmp_path):
    """--variants-at-row-settings keeps the rows' settings (bf16 tokens here) and --variant-point-batch-sizes times
    each prompt count per decoder call: the same masks, whatever the count, up to rounding at the threshold."""
    result, _ = run_quick_bench(tmp_path, "--no-sam-details", "--decoder-variants", "folded", "--bf16-decoder-tokens",
                                "--variants-at-row-settings", "--variant-point-batch-sizes", "7,64")
    variants = result["decoder_variants"]
    assert set(variants) == {"folded_eager_bf16_tokens_pb7", "folded_eager_bf16_tokens_pb64"}
    assert variants["folded_eager_bf16_tokens_pb7"]["candidates"] > 0
    # the same masks up to a logit at the threshold: the products' blocking follows the prompt count (a full-suite
    # run on 2026-12-06 gave IoU 0.99999 where runs alone gave 1.0)
    assert variants["folded_eager_bf16_tokens_pb64"]["mask_iou_vs_first"] > 0.999


def test_decoder_variants_with_the_candidates_read_per_batch_and_per_call(tmp_path):
    """--candidate-reads batch,call: the same candidates, read back once per batch or after every decoder call."""
    result, printed = run_quick_bench(tmp_path, "--no-sam-details", "--decoder-variants", "folded",
                                      "--candidate-reads", "batch,call", "--point-batch-size", "16")
    variants = result["decoder_variants"]
    assert set(variants) == {"folded_eager", "folded_eager_reads_per_call"}
    assert variants["folded_eager_reads_per_call"]["candidates"] == variants["folded_eager"]["candidates"] > 0
    assert variants["folded_eager_reads_per_call"]["mask_iou_vs_first"] == 1.0
    assert "reads_per_call" in printed
