"""How much of the picture a cache's semantic latents carry, in a form a decoder can pick up: a ridge
regression from each row's z_C to its image's 8x8 colour thumbnail, fitted on the cache's training
rows and scored on its held-out rows (the validation split, by key hash), beside the control of the
same fit on latents shuffled among the rows (no information: R^2 <= 0, retrieval at chance).

    python -m benchmarks.semantic_information [--cache runs/cache/twemoji-decoders] [--json out.json]

Figures per ridge penalty: held-out R^2 of the thumbnails, and the rate at which a predicted
thumbnail is nearest its own image's among all held-out thumbnails (chance 1/N). Stage B learns its
semantic condition only as fast as the condition carries the picture: a compressor whose latents
score near the control here (a random one) makes a decoder that ignores its condition for a long time.
The cache needs the images (prep with encode.images: true), e.g. configs/prep_twemoji_decoders.yaml.
"""

import argparse

import torch

from benchmarks.report import emit
from pipelines.quality import THUMBNAIL, thumbnail_regression, thumbnails, split_rows

PENALTIES = (1.0, 10.0, 100.0, 1000.0)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default="runs/cache/twemoji-decoders")
    parser.add_argument("--validation-fraction", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0, help="of the control's shuffle")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    train = split_rows(args.cache, args.validation_fraction, held_out=False)
    test = split_rows(args.cache, args.validation_fraction, held_out=True)
    x_train, x_test = train["stage_c_latents"].flatten(1).double(), test["stage_c_latents"].flatten(1).double()
    y_train, y_test = thumbnails(train["images"]).double(), thumbnails(test["images"]).double()
    shuffle = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(args.seed))
    results = {"cache": args.cache, "train_rows": len(x_train), "held_out_rows": len(x_test),
               "latent_dims": x_train.shape[1], "thumbnail": f"{THUMBNAIL}x{THUMBNAIL}x3",
               "chance_own_retrieval": round(1 / len(x_test), 4),
               "latent_std": round(float(x_train.std() * 42), 3),  # of e = 42 z_C - 1
               "by_penalty": {}}
    for penalty in PENALTIES:
        results["by_penalty"][str(penalty)] = {
            "latents": thumbnail_regression(x_train, y_train, x_test, y_test, penalty),
            "shuffled_control": thumbnail_regression(x_train[shuffle], y_train, x_test, y_test, penalty),
        }
    emit(results, args.json)
    return results


if __name__ == "__main__":
    main()
