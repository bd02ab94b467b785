"""bench/bench_train_step.py runs on the CPU (tiny model) and reports its MFU columns; speed is never asserted."""
import json
from types import SimpleNamespace

import pytest
import torch
from torch._dynamo import config as dynamo_config
from torch.autograd import DeviceType

from bench.bench_train_step import busy_time, host_syncs, kernel_classes, main, plain_twin


def test_the_train_step_bench_reports_flops_mfu_and_busy_time_for_padded_and_packed_micro_batches(tmp_path, capsys):
    out = tmp_path / "bench.json"
    # a compiled block past dynamo's recompile limit would run eagerly, with only a warning: here it fails
    with dynamo_config.patch(fail_on_recompile_limit_hit=True):
        result = main(["--device", "cpu", "--tiny", "--micro-batch", "2", "--global-batch", "2",
                       "--checkpointing", "off", "--kinds", "plain,covt,covt_compiled_fused,covt_model_indices",
                       "--packing", "off,on", "--steps", "1", "--warmup", "0", "--count-reads",
                       "--profile", "--json", str(out)])
    printed = capsys.readouterr().out
    assert json.loads(out.read_text()) == result
    assert result["matmul_tflops"] > 0 and result["matmul_size"] == 1024
    # fp32 on the CPU: the heads amplify last-bit differences of the hidden states (tests/test_micro_batches.py)
    assert result["packing_exactness"]["loss_rel"] < 1e-5 and result["packing_exactness"]["grad_rel"] < 3e-4
    assert [(r["micro_batch"], r["packing"]) for r in result["rows"]] == [(2, False), (2, True)]
    padded, packed = result["rows"]
    assert packed["padding_fraction"] == 0 < padded["padding_fraction"]
    for row in result["rows"]:
        for kind in ("plain", "covt"):
            assert row[f"{kind}_tflop_per_step"] > 0
            assert 0 < row[f"{kind}_mfu"] <= 1
            assert row[f"{kind}_tflops"] == pytest.approx(row[f"{kind}_mfu"] * result["matmul_tflops"])
            assert row[f"{kind}_busy_fraction"] > 0 and 0 < row[f"{kind}_gemm_share"] <= 1
            # the adapters' rank-16 products apart from the base layers' (the tiny model is 64 wide)
            assert row[f"{kind}_thin_matmul_ms"] > 0 and row[f"{kind}_wide_matmul_ms"] > 0
        # the anchor heads add work; packing removes the padding's (the same samples, fewer tokens)
        assert row["covt_tflop_per_step"] > row["plain_tflop_per_step"]
        # train.compile's blocks compute the same function: the same FLOPs, counted on its eager run
        assert row["covt_compiled_fused_tflop_per_step"] == row["covt_tflop_per_step"]
        assert row["covt_compiled_fused_busy_fraction"] > 0
        # the host's time per part of the step (forward, backward, clipping and AdamW), from the profile
        assert all(row[f"{kind}_host_ms_{part}"] > 0 for kind in ("covt", "covt_compiled_fused")
                   for part in ("forward", "backward", "clip_and_optimizer"))
        # the model computing its rope positions and vision indices itself (the code before trainer/host_inputs.py)
        assert row["covt_model_indices_tflop_per_step"] == row["covt_tflop_per_step"]
        # the loader's inputs (trainer/host_inputs.py): a forward and backward that reads nothing from the device
        assert row["covt_device_reads"] == row["covt_compiled_fused_device_reads"] == 0
        assert row["covt_model_indices_device_reads"] > 0
        # every block's forward through compiled code (2 decoder layers + 2 vision blocks; the kind steps the fused
        # AdamW, train.optim=adamw_torch_fused), none in the eager kinds
        assert row["covt_compiled_fused_compiled_calls"] >= 4 and row["covt_compiled_calls"] == 0
    assert packed["plain_tflop_per_step"] < padded["plain_tflop_per_step"]
    # the model MFU counts the samples' own work, each at its length: below the padded step's MFU, the same samples
    assert result["sample_tflop"]["covt"] > result["sample_tflop"]["plain"] > 0
    for kind in ("plain", "covt"):
        assert 0 < padded[f"{kind}_model_mfu"] < padded[f"{kind}_mfu"]
        assert padded[f"{kind}_model_mfu"] == pytest.approx(
            result["sample_tflop"][kind] * 1e12 / (padded[f"{kind}_ms"] / 1000) / (result["matmul_tflops"] * 1e12))
    # CoVT over plain where the plain step at the same settings ran: only covt's here
    assert [k for k in padded if k.endswith("_over_plain")] == ["covt_over_plain"]
    assert padded["covt_over_plain"] == padded["covt_ms"] / padded["plain_ms"]
    header = next(line for line in printed.splitlines() if line.startswith("| micro-batch"))
    for column in ("covt/plain", "packing", "covt TFLOP/step", "covt TFLOP/s", "covt MFU", "covt model MFU",
                   "covt busy (GEMM)",
                   "plain MFU", "covt_compiled_fused MFU"):
        assert f"| {column} |" in header


def test_the_recomputed_dropout_kinds_time_the_same_step_with_the_adapters_dropout_made_again():
    """_recomputed_dropout: train.lora.recompute_dropout in the bench, with the same FLOPs (the checkpoint stops
    recomputing once the dropped input is made again: lora_A's product does not run twice), and its plain twin has
    the same setting."""
    result = main(["--device", "cpu", "--tiny", "--micro-batch", "2", "--global-batch", "2", "--checkpointing", "off",
                   "--kinds", "plain_recomputed_dropout,covt,covt_recomputed_dropout", "--packing", "off",
                   "--steps", "1", "--warmup", "0"])
    row = result["rows"][0]
    assert row["covt_recomputed_dropout_ms"] > 0
    assert row["covt_recomputed_dropout_tflop_per_step"] == row["covt_tflop_per_step"]
    assert "covt_recomputed_dropout_over_plain" in row and "covt_over_plain" not in row
    with pytest.raises(ValueError, match="has not run inside a CUDA graph"):
        main(["--device", "cpu", "--tiny", "--kinds", "covt_recomputed_dropout_graphed", "--steps", "1"])


def test_each_covt_kind_is_divided_by_the_plain_kind_of_its_settings():
    assert plain_twin("covt") == "plain"
    assert plain_twin("covt_bf16_inputs_compiled_fused") == "plain_bf16_inputs_compiled_fused"
    # a plain step has no SAM head: the matching's place is not one of its settings
    assert plain_twin("covt_bf16_inputs_compiled_fused_device_matching") == "plain_bf16_inputs_compiled_fused"
    assert plain_twin("plain_compiled") is None and plain_twin("library") is None


def test_grouped_query_sdpa_kernels_count_each_key_head_once_per_query_head():
    """An unpadded micro-batch takes transformers' grouped-query SDPA path (4 key/value heads for 28 query heads in
    the 7B), on which the FlopCounterMode formulas of the device's torch 2.11 assert; the bench's count it as the
    repeated heads."""
    import torch
    from torch.utils import flop_counter

    from bench.bench_train_step import grouped_query_sdpa_flops

    query, grouped, repeated = (1, 28, 96, 128), (1, 4, 96, 128), (1, 28, 96, 128)
    formulas = grouped_query_sdpa_flops()
    aten = torch.ops.aten
    for kernel in ("efficient", "flash", "cudnn"):
        forward = formulas[getattr(aten, f"_scaled_dot_product_{kernel}_attention")]
        backward = formulas[getattr(aten, f"_scaled_dot_product_{kernel}_attention_backward")]
        assert forward(query, grouped, grouped) == flop_counter.sdpa_flop_count(query, repeated, repeated) > 0
        assert backward(query, query, grouped, grouped) == \
            flop_counter.sdpa_backward_flop_count(query, query, repeated, repeated) > 0


def test_host_syncs_says_where_each_sync_was_issued_and_keeps_the_result():
    import warnings

    import torch

    def reads_twice() -> int:
        for _ in range(2):  # one place, said once
            warnings.warn("called a synchronizing CUDA operation", stacklevel=1)
        warnings.warn("an unrelated warning", stacklevel=1)
        return 7

    result, places = host_syncs(reads_twice, torch.device("cpu"))
    assert result == 7
    assert len(places) == 1 and "reads_twice" in places[0] and "test_bench_train_step.py" in places[0]


def test_compiled_heads_kinds_compile_the_blocks_only_when_their_name_says_so():
    from bench.bench_train_step import blocks_compiled, compiled_kind

    assert blocks_compiled("covt_bf16_inputs_compiled_fused_compiled_heads") and compiled_kind("covt_compiled_heads")
    assert not blocks_compiled("covt_bf16_inputs_fused_compiled_heads")
    assert not compiled_kind("covt_bf16_inputs_fused") and blocks_compiled("plain_compiled")


def event(key: str, microseconds: float, device_type=DeviceType.CUDA) -> SimpleNamespace:
    return SimpleNamespace(key=key, device_type=device_type, self_device_time_total=microseconds,
                           self_cpu_time_total=0.0, is_user_annotation=False)


def test_the_gemm_share_of_a_replayed_graph_comes_from_its_kernels_names():
    direct = [event("aten::mm", 300.0, DeviceType.CPU), event("nvjet_sm90_tst_192x128_64x5_1x2_h_bz_NNT", 300.0),
              event("triton_poi_fused_add_mul_silu_0", 100.0)]
    replayed = [event("nvjet_sm90_tst_192x128_64x5_1x2_h_bz_NNT", 300.0), event("sm90_xmma_gemm_bf16", 100.0),
                event("cudnn_generated_fort_native_sdpa_sm90_flash_bprop", 100.0)]
    cuda = torch.device("cuda")
    assert busy_time(direct, cuda)["gemm_share"] == pytest.approx(0.75)  # the operator's, as before
    assert busy_time(replayed, cuda) == {"busy_ms": 0.5, "gemm_share": pytest.approx(0.8), "compiled_calls": 0}


def test_kernel_time_is_sorted_into_classes_by_the_kernels_names():
    kernels = [event("nvjet_sm90_tst_192x128_64x5_1x2_h_bz_NNT", 300.0),
               event("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma", 100.0),
               event("fmha_cutlassF_bf16_aligned_64x64", 50.0),  # CUTLASS's attention: attention, not a product
               event("triton_poi_fused_add_mul_native_dropout_silu_0", 40.0),
               event("void at::native::elementwise_kernel<128, 4>", 20.0), event("Memcpy HtoD (Pinned -> Device)", 5.0),
               event("void at::native::reduce_kernel<512, 1>", 3.0), event("some_custom_kernel", 2.0),
               event("aten::mm", 300.0, DeviceType.CPU)]  # an operator row: its kernel is counted already
    assert kernel_classes(kernels, torch.device("cuda")) == pytest.approx({
        "attention_ms": 0.15, "matmul_ms": 0.3, "inductor_ms": 0.04, "copy_ms": 0.005, "elementwise_ms": 0.02,
        "reduction_ms": 0.003, "other_ms": 0.002})
    assert kernel_classes(kernels, torch.device("cpu")) == {}


def test_the_causal_only_kinds_time_the_step_without_the_padding_mask_and_report_its_exactness(capsys):
    """_causal_only: train.padding_mask false in the bench. The bench first compares it with the mask on one
    right-padded micro-batch (fp32 on the CPU: equal within rounding, as tests/test_micro_batches.py bounds it),
    then times it; the same FLOPs are counted (the counter counts sdpa's whole product either way)."""
    result = main(["--device", "cpu", "--tiny", "--micro-batch", "2", "--global-batch", "2", "--checkpointing", "off",
                   "--kinds", "covt,covt_causal_only", "--packing", "off", "--steps", "1", "--warmup", "0"])
    printed = capsys.readouterr().out
    found = result["causal_exactness"]
    assert found["loss_rel"] < 1e-5 and found["grad_rel"] < 1e-5 and found["grad_rel_masked"] < 1e-6
    assert "causal text attention (train.padding_mask false) vs masked, micro-batch of 2" in printed
    row = result["rows"][0]
    assert row["padding_fraction"] > 0 and row["covt_causal_only_ms"] > 0
    assert row["covt_causal_only_tflop_per_step"] == row["covt_tflop_per_step"]


def test_the_split_k_kinds_time_the_step_with_the_adapters_products_split(monkeypatch):
    """_split_k: train.lora.split_k in the bench (slices from 8 reduction elements, so that the tiny model's layers
    split as the 7B's do), the same FLOPs counted: the batched slices are the same products."""
    from trainer import split_k

    monkeypatch.setattr(split_k, "MIN_SLICE", 8)
    result = main(["--device", "cpu", "--tiny", "--micro-batch", "2", "--global-batch", "2", "--checkpointing", "off",
                   "--kinds", "covt,covt_split_k", "--packing", "off", "--steps", "1", "--warmup", "0"])
    row = result["rows"][0]
    assert row["covt_split_k_ms"] > 0
    assert row["covt_split_k_tflop_per_step"] == pytest.approx(row["covt_tflop_per_step"], rel=1e-9)
