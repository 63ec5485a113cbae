"""Stage C's validation on two ranks, side by side in one run: every rank computing all of it (as
before the validation was spread) against the work spread over the ranks (each a world-th of the
held-out rows and of the retrieval captions, `parallel.mean_over_ranks` / `spread_over_ranks`), with
the same model, rows and captions; and that both give the same figures.

    python -m benchmarks.validation_spread [--flavor small] [--rows 64] [--captions 32] [--rounds 3] [--threads 1]

Two gloo ranks on CPU, each with `--threads` torch threads (the trainer's CPU workers have one core
each). What is validated is a StageCTask's `validation_loss`: the fixed-grid loss and the condition
gap of `--rows` held-out rows, and retrieval for `--captions` held-out and as many training captions
(the validation's default steps, guidance and seed). The two modes alternate over `--rounds` rounds
(the median of each is reported); "all" is the spread code with the process group hidden from it.
"""

import argparse
import contextlib
import os
import statistics
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.report import emit

MODES = ("all", "spread")


def _rows(count: int, c_cond: int, side: int, seed: int, caption: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    rows = {"key": np.array([f"row{seed}-{i}" for i in range(count)], dtype=object),
            "stage_c_latents": rng.standard_normal((count, 16, side, side)).astype(np.float16),
            "text_embeddings": rng.standard_normal((count, 77, c_cond)).astype(np.float16)}
    if caption:
        rows["caption"] = np.array([f"caption {i}" for i in range(count)], dtype=object)
    return rows


@contextlib.contextmanager
def _hidden(hide: bool):
    """The process group hidden from the validation (each rank computes all of it) when `hide`."""
    from pipelines.training import parallel

    saved = parallel.is_distributed
    if hide:
        parallel.is_distributed = lambda: False
    try:
        yield
    finally:
        parallel.is_distributed = saved


def _worker(rank: int, args, port: int, queue) -> None:
    from core.config import load
    from pipelines.training.config import TrainConfig
    from pipelines.training.tasks import StageCTask

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(args.threads)
    cfg = load(TrainConfig, None, [f"model.flavor={args.flavor}", f"validation.retrieval_captions={args.captions}"])
    torch.manual_seed(0)
    model = cfg.model.build().train()
    with torch.no_grad():  # off its zero-initialised layers, so that the text changes the figures
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    c_cond = cfg.model.model_config().c_cond
    held = _rows(args.rows, c_cond, args.side, seed=1)
    batches = [{k: v[i:i + args.batch] for k, v in held.items()} for i in range(0, args.rows, args.batch)]
    task = StageCTask(cfg.model, cfg.encoders, cfg.objective, cfg.validation, "embeddings",
                      empty_text=np.zeros((77, c_cond), np.float32),
                      train_probe=_rows(args.captions, c_cond, args.side, seed=2, caption=True)).setup(torch.device("cpu"))
    times, figures = {m: [] for m in MODES}, {}
    for _ in range(args.rounds):
        for mode in MODES:
            dist.barrier()
            start = time.perf_counter()
            with _hidden(mode == "all"):
                figures[mode] = task.validation_loss(model, batches)
            dist.barrier()
            times[mode].append(time.perf_counter() - start)
    queue.put((rank, times, figures))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--rows", type=int, default=64, help="held-out rows")
    parser.add_argument("--captions", type=int, default=32, help="retrieval captions, held-out and training each")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--side", type=int, default=6, help="the latents' side (6: 256 px images)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_worker, args=(args, port, queue), nprocs=2, start_method="spawn", join=True)
    ranks = sorted(queue.get() for _ in range(2))
    times = {m: [max(r[1][m][i] for r in ranks) for i in range(args.rounds)] for m in MODES}  # the slower rank's
    figures = {m: ranks[0][2][m] for m in MODES}
    same = all(r[2][m] == figures[m] for r in ranks for m in MODES)
    differences = {k: abs(figures["spread"][k] - figures["all"][k]) for k in figures["all"]}
    results = {"flavor": args.flavor, "held_out_rows": args.rows, "retrieval_captions": 2 * args.captions,
               "side": args.side, "threads_per_rank": args.threads, "ranks": 2,
               **{f"{m}_s": times[m] for m in MODES}, **{f"{m}_s_median": statistics.median(times[m]) for m in MODES},
               "ratio_spread_over_all": statistics.median(times["spread"]) / statistics.median(times["all"]),
               "ranks_agree": same, "figures": figures["spread"], "largest_figure_difference": max(differences.values())}
    emit(results, args.json)
    return results


if __name__ == "__main__":
    main()
