"""Data prep on one GPU node at the v2 sizes: end to end against the GPU encoders alone, and the GPU's
latents against fp32 on the CPU.

    python -m benchmarks.prep_gpu [--images 1024 3072] [--source-size 1280 960] [--batch 64] [--precision bf16]
                                  [--encoder-cpus 4]

1. The v2 encoders with seeded random weights (BatchNorm statistics calibrated, as for the small
   flavors), written in the formats the public ones come in: diffusers-style folders for the
   semantic compressor (EfficientNetV2-S) and Stage A, a transformers CLIP folder for the ViT-bigG
   text tower. The runs load them from there, as a v2 prep loads the public checkpoints.
2. End to end: `run_prep` on webdataset shards of JPEGs at `--source-size` on a local Ray cluster
   with the node's CPUs and its GPU (the decode tasks check and hash the images on the CPUs; the
   encoder actor's `--encoder-cpus` threads decode and cut them again into pinned buffers while the
   GPU encodes under autocast), after an unmeasured one-shard run; images/s over whole runs of two
   sizes and the marginal rate between them, as in `prep_throughput`.
3. The encoder-only bound: the encoders on the GPU in a tight loop on already-decoded, cut pixels in
   pinned memory, in batches of the run's batch size (`Encode.encode_batch`). Beside it, the
   encoder actor's own rate: Encode on blocks of JPEGs as the run gives them, as many blocks at a
   time as in a run, its threads decoding and cutting while the GPU encodes; below the bound when
   its threads cannot keep up.
4. Agreement: the latents of a few images from the GPU stage against the same encoders in fp32 on
   the CPU (max |difference| / max |fp32 value|, per tensor).

`--text-layers 2 --resolution 256 --device cpu` is a smoke run of the script on a CPU machine. On a
GPU node without open_clip, pass `--tokenizer DIR` with the folder that
`stages.text_encoders.write_clip_tokenizer_files` writes.
"""

import argparse
import dataclasses
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.prep_throughput import image_blocks, run_ratios
from benchmarks.report import emit

BIGG = {"width": 1280, "layers": 32, "heads": 20}  # the v2 prior's text tower (CLIP ViT-bigG/14)


def write_v2_encoders(folder: Path, tokenizer_dir: str, text_layers: int, device: str) -> dict[str, str]:
    """Seeded random v2 encoders in their checkpoint formats; returns the paths for the config."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from latent_cache.encoders import calibrate_batchnorm
    from stages import SemanticCompressor, StageA
    from stages.text_encoders import CONTEXT_LENGTH, ClipTextEncoder

    torch.manual_seed(0)
    semantic = calibrate_batchnorm(SemanticCompressor.from_flavor("v2"), lambda m, x: m(x), seed=0)
    semantic.save_pretrained(folder / "semantic")
    stage_a = calibrate_batchnorm(StageA.from_flavor("v2"), lambda m, x: m.encode(x), seed=0)
    stage_a.save_pretrained(folder / "stage_a")
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=BIGG["width"], intermediate_size=4 * BIGG["width"],
        num_hidden_layers=text_layers, num_attention_heads=BIGG["heads"], max_position_embeddings=CONTEXT_LENGTH,
        hidden_act="gelu", pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    with torch.device(device):  # initialising 700M parameters is faster on the GPU
        model = CLIPTextModel(config)
    ClipTextEncoder(tokenizer, model.half().cpu(), "transformers").save_pretrained(folder / "text")
    return {"semantic": str(folder / "semantic"), "stage_a": str(folder / "stage_a"), "text": str(folder / "text")}


def _picture(args: tuple[int, int, int, int]) -> bytes:
    """(seed, width, height, grain) -> a smooth random picture (colour fields at several scales) as
    a JPEG; `grain` adds uniform noise of that amplitude, which makes its JPEG the size of a photo's."""
    import io

    from PIL import Image

    seed, width, height, grain = args
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), np.float32)
    for cells in (2, 8, 32):
        small = Image.fromarray((rng.random((cells, cells, 3)) * 255).astype(np.uint8))
        image += np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), np.float32) / cells**0.5
    image = 255 * (image - image.min()) / (image.max() - image.min())
    if grain:
        image += rng.uniform(-grain, grain, image.shape).astype(np.float32)
    out = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue()


def write_source(folder: Path, images: int, per_shard: int, size: tuple[int, int], first_seed: int, grain: int = 0) -> Path:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from prep_factory import write_tar

    folder.mkdir(parents=True)
    with multiprocessing.get_context("spawn").Pool() as pool:
        pictures = pool.map(_picture, [(first_seed + i, *size, grain) for i in range(images)], chunksize=8)
    for s in range(0, images, per_shard):
        members = []
        for i in range(s, min(images, s + per_shard)):
            members += [(f"img{i:06d}.jpg", pictures[i]), (f"img{i:06d}.txt", f"a picture of colour fields number {i}".encode())]
        write_tar(folder / f"shard-{s // per_shard:04d}.tar", members)
    return folder


def prep_config(source: Path, output: Path, weights: dict, args):
    from data_prep.config import PrepConfig
    from core.config import load

    return load(PrepConfig, None, [
        f"source.url={source}", "source.format=webdataset", f"output.url={output}", "encode.flavor=v2",
        f"encode.resolution={args.resolution}", f"encode.batch_size={args.batch}", "encode.text_mode=embeddings",
        f"encode.semantic.path={weights['semantic']}", f"encode.stage_a.path={weights['stage_a']}",
        f"encode.text_encoder.path={weights['text']}", f"encode.use_gpu={args.device == 'cuda'}",
        f"encode.precision={args.precision}", f"encode.num_encoders={args.encoders}",
        f"encode.cpus_per_encoder={args.encoder_cpus}", "filters.dedup.exact=true",
        f"output.shards_per_wave={args.shards_per_wave}",
    ])


def encoder_bound(stage, pictures: list[bytes], calls: int) -> float:
    """Images/s of the encoders alone on the device: `calls` batches of batch_size images, decoded
    and cut beforehand into host buffers (pinned on CUDA, as the actor's are), through
    `Encode.encode_batch`."""
    import torch

    def synchronize():
        if stage.device.type == "cuda":
            torch.cuda.synchronize()

    batch_size = stage.cfg.batch_size
    squares = [stage.cut(pictures[i % len(pictures)]) for i in range(batch_size)]
    buffers = {name: torch.from_numpy(np.stack([s[name] for s in squares])) for name in squares[0]}
    if stage.device.type == "cuda":
        buffers = {name: buffer.pin_memory() for name, buffer in buffers.items()}
    captions = [f"picture number {i}" for i in range(batch_size)]
    stage.encode_batch(buffers, captions)  # warm-up: kernels chosen, memory pools filled
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        stage.encode_batch(buffers, captions)
    synchronize()
    return calls * batch_size / (time.perf_counter() - start)


def encode_actor_rate(stage, pictures: list[bytes], calls: int) -> float:
    """Images/s of Encode on blocks of JPEGs of batch_size rows (as a run gives them), ENCODER_CALLS
    blocks at a time (as a run runs them): its threads decode and cut while the device encodes."""
    from concurrent.futures import ThreadPoolExecutor

    from data_prep.operators import ENCODER_CALLS

    blocks = image_blocks(pictures, calls + 1, stage.cfg.batch_size)
    stage(blocks[0])  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(ENCODER_CALLS) as running:
        list(running.map(stage, blocks[1:]))  # returns numpy-backed columns: the device work is done
    return calls * stage.cfg.batch_size / (time.perf_counter() - start)


def agreement(cfg, stage, pictures: list[bytes], rows: int = 4) -> dict[str, float]:
    """max |GPU - fp32 CPU| / max |fp32 CPU| of each latent, for `rows` images."""
    from latent_cache.spec import TENSOR_DTYPES
    from latent_cache.writer import binary_buffers
    from data_prep.operators import Encode

    block = image_blocks(pictures, 1, rows)[0]
    cpu_cfg = dataclasses.replace(cfg.encode, use_gpu=False, batch_size=rows, cpus_per_encoder=max(1, rows))
    cpu = Encode(cpu_cfg, cfg.filters.max_pixels)
    ours, reference = stage(block), cpu(block)
    out = {}
    for name in stage.columns:
        a, b = (binary_buffers(t.column(name))[1].view(TENSOR_DTYPES[name]).astype(np.float64) for t in (ours, reference))
        out[name] = float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-12))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs=2, default=[1024, 3072])
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--shards-per-wave", type=int, default=4)
    parser.add_argument("--source-size", type=int, nargs=2, default=[1280, 960], metavar=("W", "H"))
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--precision", default="bf16")
    parser.add_argument("--encoders", type=int, default=1, help="encoder actors (one per GPU)")
    parser.add_argument("--encoder-cpus", type=int, default=4,
                        help="CPUs of each encoder actor: its threads decode and cut the images (~30 ms of CPU an image at 1280x960 -> 1024)")
    parser.add_argument("--text-layers", type=int, default=BIGG["layers"])
    parser.add_argument("--bound-calls", type=int, default=24)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tokenizer", help="a CLIP tokenizer folder (vocab.json, merges.txt); default: written from open_clip's BPE")
    parser.add_argument("--json")
    args = parser.parse_args(argv)

    import ray
    import torch

    from core.ray_cluster import connect
    from data_prep.runner import run_prep

    results = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
               "cpus": multiprocessing.cpu_count(), **{k: v for k, v in vars(args).items() if k not in ("json", "tokenizer")}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        if args.tokenizer is None:  # a machine without open_clip passes a folder written elsewhere
            from stages.text_encoders import write_clip_tokenizer_files

            args.tokenizer = str(write_clip_tokenizer_files(tmp / "tokenizer"))
        weights = write_v2_encoders(tmp / "weights", args.tokenizer, args.text_layers, args.device)
        results["seconds_writing_weights"] = time.perf_counter() - start
        sources = {n: write_source(tmp / f"src-{n}", n, args.per_shard, tuple(args.source_size), first_seed=n * 10)
                   for n in sorted({args.per_shard, *args.images})}  # a size may serve twice
        connect()  # a local cluster of the node's CPUs (at least 4 logical ones) and its GPUs
        run_prep(prep_config(sources[args.per_shard], tmp / "cache-warm-up", weights, args))
        runs = {}
        for n in args.images:
            start = time.perf_counter()
            summary = run_prep(prep_config(sources[n], tmp / f"cache-{n}", weights, args))
            runs[n] = {"seconds": time.perf_counter() - start, "images": summary["rows_in"], "written": summary["rows_written"]}
        ray.shutdown()
        from latent_cache.reader import Cache

        table = Cache(str(tmp / f"cache-{args.images[-1]}")).read_table(["stage_c_latents", "stage_a_latents"])
        for name in table.column_names:
            latents = table.column(name).combine_chunks().to_numpy_ndarray().astype(np.float32)
            results[f"cache_{name}"] = {"shape": list(latents.shape), "finite": bool(np.isfinite(latents).all()),
                                        "std_across_images": float(latents.std(axis=0).mean())}
        from data_prep.operators import Encode

        cfg = prep_config(sources[args.per_shard], tmp / "unused", weights, args)
        pictures = [_picture((seed, *args.source_size, 0)) for seed in range(8)]
        if args.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        stage = Encode(cfg.encode, cfg.filters.max_pixels)
        bound = encoder_bound(stage, pictures, args.bound_calls)
        if args.device == "cuda":
            results["encoder_peak_gpu_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
        results["encode_actor_images_per_s"] = encode_actor_rate(stage, pictures, args.bound_calls)
        results["agreement_max_rel_vs_fp32_cpu"] = agreement(cfg, stage, pictures)
    results.update(run_ratios(runs, bound))
    emit(results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
