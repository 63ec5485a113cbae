"""The memory plan (`wuerstchen plan`, pipelines/training/memory.py) against the memory a real
training step takes on the CPU, and the refusal of a run that does not fit."""

import ctypes
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks.memory_plan import config as _config
from benchmarks.memory_plan import shapes_of as _shapes
from benchmarks.memory_plan import train_steps

# The plan's error against the measured peak, stated (README) and held here (measured: within 1.5%).
STATED_ERROR = 0.05


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def _in_use() -> int:
    """Bytes the C heap holds now (where PyTorch's CPU allocator takes tensors from)."""
    info = _libc.mallinfo2()
    return info.uordblks + info.hblkhd


class PeakMemory(TorchDispatchMode):
    """The peak of the heap's bytes in use, read after every operator."""

    def __init__(self):
        super().__init__()
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, _in_use())
        return out


def measured_peak(cfg, shapes: dict, rank: int = 0) -> int:
    """The heap's peak above what it held before, over two real training steps (TrainState.build and
    train_step, as a worker runs them; benchmarks.memory_plan, which measures a GPU's the same way)."""
    base = _in_use()
    with PeakMemory() as peak:
        train_steps(cfg, shapes, torch.device("cpu"), rank)
    return peak.peak - base


@pytest.mark.parametrize("sets,side", [
    (["model.flavor=small", "data.batch_size=8"], 24),
    (["model.flavor=small", "data.batch_size=16", "model.activation_checkpointing=full"], 24),
    (["model.flavor=tiny", "data.batch_size=32", "model.activation_checkpointing=selective", "ema.mode=none"], 24),
    (["model.flavor=small", "data.batch_size=8", "model.init=base", "model.lora.rank=8"], 24),  # the base frozen
])
def test_the_plan_is_within_its_stated_error_of_the_measured_peak(sets, side):
    from pipelines.training.memory import estimate

    cfg = _config(sets)
    shapes = _shapes(cfg, side)
    plan = estimate(cfg, shapes, gpus=1)
    measured = measured_peak(cfg, shapes)
    print(f"{sets} side {side}: plan {plan.total / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB")
    assert abs(plan.total - measured) <= STATED_ERROR * measured, (plan.describe(), measured / 2**20)


def _fsdp2_worker(rank: int, port: int, sets: list, side: int, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = _config(sets)
    Path(out, f"rank{rank}.txt").write_text(str(measured_peak(cfg, _shapes(cfg, side), rank)))
    dist.destroy_process_group()


@pytest.mark.integration  # two spawned processes training over gloo
def test_the_fsdp2_plan_is_within_its_stated_error_of_each_ranks_peak(tmp_path):
    """FSDP2 on two ranks: the plan (made on a fake process group of two) against the peak each rank
    measures, the parameters, gradients, optimizer state and EMA sharded."""
    from pipelines.training.memory import estimate

    sets, side = ["model.flavor=small", "data.batch_size=8", "parallel.strategy=fsdp2", "parallel.num_workers=2"], 24
    cfg = _config(sets)
    plan = estimate(cfg, _shapes(cfg, side))
    single = estimate(_config(sets[:2]), _shapes(cfg, side), gpus=1)
    assert plan.parts["optimizer"] < 0.6 * single.parts["optimizer"] and plan.parts["ema"] < 0.6 * single.parts["ema"]
    mp.start_processes(_fsdp2_worker, args=(free_port(), sets, side, str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    for rank in range(2):
        measured = int(Path(tmp_path, f"rank{rank}.txt").read_text())
        print(f"rank {rank}: plan {plan.total / 2**20:.1f} MiB, measured {measured / 2**20:.1f} MiB")
        assert abs(plan.total - measured) <= STATED_ERROR * measured, (plan.describe(), measured / 2**20)


def test_a_run_that_does_not_fit_is_refused_before_it_starts_with_its_plan():
    from pipelines.plan import check_fits

    cfg = _config(["model.flavor=tiny", "data.batch_size=8", "parallel.gpu_memory_gib=0.001", "data.cache=/nonexistent"])
    with pytest.raises(ValueError, match=r"(?s)does not fit its devices' memory:.*memory plan: Stage C tiny.*does NOT fit a 0 GiB GPU"
                                         r".*parallel.memory_check=false"):
        check_fits(cfg)
    check_fits(_config(["model.flavor=tiny", "data.batch_size=8", "parallel.gpu_memory_gib=0.001", "data.cache=/nonexistent",
                        "parallel.memory_check=false"]))  # planned, said, and let through
    check_fits(_config(["model.flavor=tiny", "data.batch_size=8", "parallel.gpu_memory_gib=8", "data.cache=/nonexistent"]))


def test_wuerstchen_plan_prints_the_plan_and_exits_3_when_it_does_not_fit(tmp_path):
    command = [sys.executable, "-m", "pipelines.plan", "--set", "model.flavor=tiny", "--set", f"data.cache={tmp_path / 'none'}",
               "--gpus", "4", "--set", "parallel.strategy=fsdp2"]
    fits = subprocess.run([*command, "--gpu-memory-gib", "16"], capture_output=True, text=True, timeout=300)
    assert fits.returncode == 0, fits.stderr
    assert "fsdp2 on 4 GPU(s)" in fits.stdout and "fits a 16 GiB GPU" in fits.stdout
    small = subprocess.run([*command, "--gpu-memory-gib", "0.001"], capture_output=True, text=True, timeout=300)
    assert small.returncode == 3 and "does NOT fit" in small.stdout
