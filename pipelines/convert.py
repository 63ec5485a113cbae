"""`wuerstchen convert`: an original (dome272/Wuerstchen) `.pt` checkpoint -> a diffusers-format folder.

    wuerstchen convert --stage c --checkpoint model_v3_stage_c.pt --out prior/
    wuerstchen convert --stage b --checkpoint model_v2_stage_b.pt --out decoder/
    wuerstchen convert --stage effnet --checkpoint model_v2_stage_b.pt --out semantic_compressor/
    wuerstchen convert --stage a --checkpoint vqgan_f4_v1_500k.pt --out vqgan/

The original files carry no config: `--flavor` (default v2, the public sizes) says which one to build.
"""

import sys
from pathlib import Path

import torch

from pipelines.cli import job_parser, run_job
from stages import StageA, StageB, StageC
from stages.original_format import DEFAULT_STATE_KEYS, load_original, load_original_semantic_compressor

_STAGES = {"c": StageC, "b": StageB, "a": StageA}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    parser = job_parser("convert", __doc__, {
        0: "written",
        1: "failed",
        2: "bad input: no checkpoint file, or a checkpoint that does not fit the stage and flavor",
    })
    parser.add_argument("--stage", required=True, choices=["c", "b", "a", "effnet"])
    parser.add_argument("--checkpoint", required=True, type=Path, help="the original .pt file")
    parser.add_argument("--out", required=True, type=Path, help="folder to write config.json + safetensors into")
    parser.add_argument("--flavor", default="v2")
    parser.add_argument(
        "--state-key",
        action="append",
        help=f"which state dict of the file to take, in order of preference (default: {', '.join(DEFAULT_STATE_KEYS)})",
    )
    parser.add_argument("--dtype", default="fp32", choices=sorted(_DTYPES), help="dtype of the written weights")
    args = parser.parse_args(argv)

    def convert() -> None:
        if args.stage == "effnet":
            model = load_original_semantic_compressor(args.checkpoint, flavor=args.flavor)
        else:
            keys = tuple(args.state_key) if args.state_key else DEFAULT_STATE_KEYS
            model = load_original(_STAGES[args.stage], args.checkpoint, flavor=args.flavor, state_keys=keys)
        model.save_pretrained(args.out, dtype=_DTYPES[args.dtype])
        print(f"wrote {type(model).__name__} ({model.num_parameters():,} parameters) to {args.out}")

    return run_job("convert", convert)


if __name__ == "__main__":
    sys.exit(main())
