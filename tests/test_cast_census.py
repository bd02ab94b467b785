"""bench/cast_census.py on the CPU: it finds the casts of the bf16 CoVT step by source line (counts, not speed)."""
import json

from bench.cast_census import BACKWARD, main


def test_the_census_names_the_lines_that_cast_and_what_fp32_inputs_adds(tmp_path):
    out = tmp_path / "census.json"
    result = main(["--device", "cpu", "--micro-batch", "2", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    peft, uncast = result["fp32_inputs_true"], result["fp32_inputs_false"]

    def casts(found: dict, fragment: str) -> int:
        return sum(row["casts"] for row in found["sites"] if fragment in row["site"])

    # per LoRA layer (28 x 7 in the LLM, 32 x 5 in the vision tower, 2 in the merger): peft copies the bf16
    # input to fp32 (tuners_utils), and autocast casts it back with the two adapter weights (lora/layer.py)
    adapters = 28 * 7 + 32 * 5 + 2
    assert casts(peft, "peft/tuners/tuners_utils.py") == adapters
    assert casts(peft, "peft/tuners/lora/layer.py") == 3 * adapters
    assert casts(uncast, "peft/tuners/tuners_utils.py") == 0
    assert casts(uncast, "peft/tuners/lora/layer.py") == 2 * adapters  # the weights only
    # Qwen2.5-VL's RMSNorm computes in fp32: two casts per norm (28 x 2 + 1 in the LLM, 32 x 2 + 1 in the tower)
    norms = 28 * 2 + 1 + 32 * 2 + 1
    for found in (peft, uncast):
        assert casts(found, "modeling_qwen2_5_vl.py:70 hidden_states = hidden_states.to(torch.float32)") == norms
        assert casts(found, BACKWARD) > 0
    assert uncast["casts"] < peft["casts"] and uncast["elements"] < peft["elements"] / 2


def test_a_cast_from_another_thread_counts_as_the_backward():
    """On CUDA the autograd engine runs the backward in a thread of its own, whose stack holds no frame of the census:
    such a cast is the backward's (the device run of 2026-12-07 stopped there before)."""
    import threading

    from bench.cast_census import source_line

    found = []
    thread = threading.Thread(target=lambda: found.append(source_line()))
    thread.start()
    thread.join()
    assert found == [BACKWARD]
