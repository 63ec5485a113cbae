"""DDP with contiguous convolution weights (as built) against channels-last ones (as the trainer lays
them out: `regions.channels_last_convolutions`), side by side in one run: the step time of each and
how many "Grad strides do not match bucket view strides" warnings DDP gives.

    python -m benchmarks.ddp_layout [--flavor small] [--batch 16] [--side 6] [--rounds 4] [--steps 5] [--device cpu]

Two ranks (gloo on CPU, NCCL with --device cuda and two GPUs), each with `--threads` torch threads.
The two layouts run in alternating windows of `--steps` timed steps (after a warm-up step each), so
that a machine's drift lands on both; the figure is the median step time of each over all windows.
"""

import argparse
import os
import statistics
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from benchmarks.report import emit

LAYOUTS = ("contiguous", "channels_last")


def _worker(rank: int, args, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=2)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    from pipelines.training.regions import channels_last_convolutions
    from stages import StageC
    from stages.objectives import StageCObjective, stage_c_loss

    steps, caught = {}, {}
    for layout in LAYOUTS:
        torch.manual_seed(0)
        model = StageC.from_flavor(args.flavor)
        if layout == "channels_last":
            channels_last_convolutions(model)
        model = torch.nn.parallel.DistributedDataParallel(model.to(device), device_ids=[rank] if cuda else None)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
        z = torch.randn(args.batch, 16, args.side, args.side, device=device) * 0.02
        text = torch.randn(args.batch, 77, model.module.config.c_cond, device=device)
        objective = StageCObjective(caption_dropout=0.0)

        def step(model=model, optimizer=optimizer, z=z, text=text):
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
                stage_c_loss(model, z, text, None, objective).backward()
            optimizer.step()

        steps[layout], caught[layout] = step, []
    times = {layout: [] for layout in LAYOUTS}
    for _ in range(args.rounds):
        for layout in LAYOUTS:
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                steps[layout]()  # warm-up after the other layout ran
                for _ in range(args.steps):
                    if cuda:
                        torch.cuda.synchronize(device)
                    start = time.perf_counter()
                    steps[layout]()
                    if cuda:
                        torch.cuda.synchronize(device)
                    times[layout].append(time.perf_counter() - start)
            caught[layout] += [w for w in seen if "Grad strides do not match" in str(w.message)]
    if rank == 0:
        queue.put({layout: {"step_s_median": statistics.median(times[layout]), "grad_stride_warnings": len(caught[layout])}
                   for layout in LAYOUTS})
    dist.destroy_process_group()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavor", default="small")
    parser.add_argument("--batch", type=int, default=16, help="per rank")
    parser.add_argument("--side", type=int, default=6, help="z_C's height and width: 6 in the demo's cache, 24 at 1024 px")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_worker, args=(args, port, queue), nprocs=2, start_method="spawn", join=True)
    results = {"flavor": args.flavor, "batch_per_rank": args.batch, "side": args.side, "device": args.device,
               "threads": args.threads, **queue.get()}
    results["ratio_channels_last_over_contiguous"] = (results["channels_last"]["step_s_median"]
                                                      / results["contiguous"]["step_s_median"])
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
