"""bench/bench_mask_kernel.py on the CPU (--quick, Triton's interpreter): it runs each configuration and checks its
masks and counts against the first's."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_mask_kernel_bench_times_each_configuration(tmp_path):
    out = tmp_path / "kernel.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "bench/bench_mask_kernel.py", "--quick", "--json", str(out)], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["prompts"] == 1 and result["dtype"] == "float32" and result["tflop_per_call"] > 0
    # the third: 2 programs per prompt; the last two: the grouped kernel
    assert set(result["rows"]) == {"4096x4x4", "4096x4x1", "2048x4x4", "g1024x4x4", "g2048x4x1"}
    first = result["rows"]["4096x4x4"]["digest"]
    assert all(row["digest"] == first and row["s"] > 0 for row in result["rows"].values())
    assert "4096x4x1" in proc.stdout and "masks and counts equal" in proc.stdout


def test_isolated_rows_survive_a_configuration_that_fails(tmp_path):
    """--isolate: each row in its own process; a launch the kernel cannot run (here a block over the interpreter's
    largest tensor) becomes an error row, and the rows after it are still timed and compared."""
    out = tmp_path / "kernel.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "bench/bench_mask_kernel.py", "--quick", "--isolate", "--configs",
                           "4096x4x4,g4096x4x4,g1024x4x4", "--json", str(out)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert list(rows) == ["4096x4x4", "g4096x4x4", "g1024x4x4"]
    assert "numel" in rows["g4096x4x4"]["error"] and "failed:" in proc.stdout
    assert any("Traceback" in line for line in rows["g4096x4x4"]["stderr_tail"])
    assert rows["4096x4x4"]["digest"] == rows["g1024x4x4"]["digest"] and rows["g1024x4x4"]["s"] > 0


def test_a_failed_row_names_the_cuda_error_not_the_asynchronous_hint():
    """On a GPU the exception's last line is the hint that CUDA reports errors asynchronously; the row keeps the
    error's own line. Without one it keeps the last exception raised, and without that the exit status."""
    from bench.bench_mask_kernel import failure

    stderr = """Traceback (most recent call last):
  File "bench/bench_mask_kernel.py", line 80, in measure
torch.AcceleratorError: CUDA error: an illegal memory access was encountered
Search for `cudaErrorIllegalAddress' in https://docs.nvidia.com/cuda/ for more information.
CUDA kernel errors might be asynchronously reported at some other API call, so the stacktrace below might be incorrect.
For debugging consider passing CUDA_LAUNCH_BLOCKING=1"""
    assert failure(stderr, 1) == "torch.AcceleratorError: CUDA error: an illegal memory access was encountered"
    assert failure("Traceback:\nValueError: bad launch\nwarning: after", 1) == "ValueError: bad launch"
    assert failure("", -9) == "exit status -9"


def test_the_autotuned_rows_leave_out_the_kernel_a_gpu_refuses_unless_asked():
    from bench.bench_mask_kernel import autotuned_rows

    assert autotuned_rows("bf16") == ["autotuned grouped"]
    assert autotuned_rows("fp32") == autotuned_rows("bf16", unrefused=True) == ["autotuned", "autotuned grouped"]
