"""The GPU benchmarks' scripts, run on the CPU with a tiny flavor so that they work when a GPU is at
hand: the matrix's rows as JSON lines, a failing row said and skipped, the deadline kept."""

import json
import os
import subprocess
import sys

import pytest
from conftest import free_port


def _matrix(tmp_path, *args) -> list[dict]:
    out = tmp_path / "rows.jsonl"
    env = {**os.environ, "MASTER_PORT": str(free_port())}
    subprocess.run([sys.executable, "-m", "benchmarks.gpu_train", "--device", "cpu", "--flavor", "tiny", "--steps", "1",
                    "--warmup", "1", "--jsonl", str(out), *args], check=True, env=env, capture_output=True, timeout=600)
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.mark.integration  # a subprocess with its own process group
def test_the_training_matrix_writes_a_line_per_row_and_keeps_its_deadline(tmp_path):
    lines = _matrix(tmp_path, "--rows", "base,b64_selective,attn_flash,profile", "--deadline-s", "600")
    assert lines[0]["header"]["flavor"] == "tiny"
    rows = {line["row"]: line for line in lines[1:]}
    assert list(rows) == ["base", "b64_selective", "attn_flash", "profile"]
    base, selective = rows["base"], rows["b64_selective"]
    assert base["samples_per_s"] > 0 and base["mfu"] > 0 and base["checkpointing"] == "none"
    # twice the batch, twice the model FLOPs; the recompute counts as hardware FLOPs only
    assert selective["model_tflops_per_step"] == pytest.approx(2 * base["model_tflops_per_step"], rel=1e-6)
    assert selective["hardware_tflops_per_step"] > selective["model_tflops_per_step"]
    assert rows["attn_flash"]["error"].startswith("RuntimeError")  # no flash kernel on a CPU: said, and the matrix goes on
    shares = rows["profile"]["kernels"]["share_by_category"]
    assert sum(shares.values()) == pytest.approx(1.0) and "matmul" in shares
    (tmp_path / "late").mkdir()
    late = _matrix(tmp_path / "late", "--rows", "base,profile", "--deadline-s", "0.001")
    assert late[1:] == [{"stopped_before": "base", "seconds_left": late[1]["seconds_left"], "longest_row_s": 0.0}]


@pytest.mark.integration  # a subprocess
def test_the_memory_plan_benchmark_plans_on_a_cpu_and_says_so(tmp_path):
    """benchmarks.memory_plan on a CPU: the plan alone (a GPU's peak is measured only on a GPU)."""
    out = tmp_path / "plan.jsonl"
    subprocess.run([sys.executable, "-m", "benchmarks.memory_plan", "--device", "cpu", "--flavor", "tiny", "--batch", "2",
                    "--checkpointing", "selective", "--side", "6", "--lora-rank", "2", "--json", str(out)],
                   check=True, capture_output=True, timeout=600)
    line = json.loads(out.read_text())
    assert line["plan_gib"] > 0 and "measured_gib" not in line
    assert "model.lora.rank=2" in line["sets"] and line["plan_parts_gib"]["parameters"] > 0
