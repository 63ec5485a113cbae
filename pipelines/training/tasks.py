"""What is specific to the model being trained, as a task object the loop calls: which model it
builds, which cache columns a batch holds, the training loss of a batch and the validation figures
(a loss, or a dict of figures with a "loss"). The loop, the train state and the checkpointer know
nothing of Stage C; Stage B, Stage A or a LoRA fine-tune plug in as other tasks with the same methods.

A task is built on the driver (it travels to the workers inside the TrainPlan, so it holds only
picklable values) and `setup(device)` on each worker builds what runs there (the text encoder).
"""

import dataclasses
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from pipelines.training.config import EncodersConfig, ModelConfig, ValidationConfig
from latent_cache.reader import numpy_columns
from latent_cache.spec import TEXT_COLUMNS
from pipelines.quality import prior_retrieval, sampled_ranks, stage_a_reconstruction
from pipelines.training.data import to_tensors
from pipelines.training.parallel import mean_over_ranks
from stages.latents import stage_c_to_semantic
from stages.objectives import (StageAObjective, StageBObjective, StageCObjective, stage_a_loss, stage_b_loss,
                               stage_b_validation_loss, stage_c_loss, stage_c_validation_loss)

STAGE_C_LATENTS = "stage_c_latents"
STAGE_A_LATENTS = "stage_a_latents"
DECODER_TEXT = "decoder_text_embeddings"
# What a Stage B batch holds: key (the fixed validation noise), h (what it learns), z_C (its semantic
# condition e = 42 z_C - 1) and the decoder's text conditioning.
STAGE_B_COLUMNS = ["key", STAGE_A_LATENTS, STAGE_C_LATENTS, DECODER_TEXT]
SEMANTIC_IMAGES = "semantic_images"
# Stage B trained with its semantic compressor reads the compressor's input images instead of z_C.
STAGE_B_WITH_COMPRESSOR_COLUMNS = ["key", STAGE_A_LATENTS, SEMANTIC_IMAGES, DECODER_TEXT]
IMAGES = "images"
# What a Stage A batch holds: the cropped training images (uint8 in the cache, [0, 1] floats in a batch).
STAGE_A_COLUMNS = ["key", IMAGES]


def stage_c_columns(text_mode: str) -> list[str]:
    """The cache columns a Stage C batch holds: key (the fixed validation noise), z_C and the text."""
    return ["key", STAGE_C_LATENTS, *TEXT_COLUMNS[text_mode]]


def text_condition(batch: dict, text_encoder) -> torch.Tensor:
    """Stage C's text conditioning: the cached embeddings, or (tokens mode) the frozen text encoder
    run on the cached tokens inside the step."""
    if "text_embeddings" in batch:
        return batch["text_embeddings"]
    with torch.no_grad():
        return text_encoder(batch["text_tokens"], batch["text_mask"]).float()


def validation_inputs(batches: Iterable[dict], device: torch.device, text_encoder) -> Iterator[tuple]:
    """(keys, z_c, text) on `device` from numpy batches of `stage_c_columns`, for stage_c_validation_loss."""
    for raw in batches:
        batch = to_tensors(raw, device)
        yield batch["key"], batch[STAGE_C_LATENTS], text_condition(batch, text_encoder)


def probe_rows(cache, count: int, fraction: float, bucket: str | None = None) -> dict:
    """`count` training rows spread over the cache (or a bucket of it; the split of `fraction`), with
    Stage C's columns, as a numpy batch: the training captions whose retrieval validation and
    evaluation measure."""
    columns = stage_c_columns(cache.manifest["text_mode"])
    return numpy_columns(cache.spread_rows(columns + ["caption"], count, fraction, bucket=bucket))


@torch.no_grad()
def retrieval_figures(model: nn.Module, rows: list[tuple], probe: dict | None, captions: int, empty: torch.Tensor,
                      steps: int, guidance: float, seed: int, text_encoder=None, space: str = "v2") -> dict[str, float]:
    """`pipelines.quality.prior_retrieval` for `captions` held-out captions spread over `rows`
    (validation_inputs of the held-out rows, on the model's device) and the training captions of
    `probe` (a numpy batch of `probe_rows`, or None): what validation and evaluation report. `space`:
    the prior's latent space (its samples are ranked among the cached latents after moving them back)."""
    held = torch.cat([z for _, z, _ in rows]), torch.cat([t for *_, t in rows])
    device = held[0].device
    probe_inputs = None
    if probe is not None:
        _, probe_z, probe_text = next(validation_inputs([probe], device, text_encoder))
        probe_inputs = probe_z, probe_text
    return prior_retrieval(model, held, probe_inputs, captions, empty, steps, guidance, seed, space)


def condition_gap(loss: Callable[[Iterator[tuple]], float], rows: list[tuple], index: int) -> dict[str, float]:
    """Whether a model uses a condition: loss(rows) ("loss"), and the same fixed-noise loss with
    element `index` of each row tuple (the condition) taken from the next row, over all rows, minus
    it ("condition_gap"). About zero while the model ignores the condition (a falling loss alone does
    not show that it uses it); positive once the condition tells it what to predict. `loss` is a mean
    over the rows it is given; under a process group each rank computes it on a share of the rows
    (`parallel.mean_over_ranks`), the shifted rows being made over all of them first."""
    own = mean_over_ranks(rows, loss)
    if sum(len(row[0]) for row in rows) < 2:
        return {"loss": own}
    sizes = [len(row[index]) for row in rows]
    others = torch.cat([row[index] for row in rows]).roll(-1, dims=0).split(sizes)
    shifted = [row[:index] + (other,) + row[index + 1:] for row, other in zip(rows, others)]
    return {"loss": own, "condition_gap": mean_over_ranks(shifted, loss) - own}


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class _Task:
    """What every task does the same way: build the model of its ModelConfig; on a worker, keep the device."""

    def build_model(self, init_state: dict | None = None) -> nn.Module:
        return self.model.build(init_state)

    def setup(self, device: torch.device):
        self.device = device
        return self


@dataclasses.dataclass
class StageCTask(_Task):
    """Training Stage C (the text-conditional prior) on cached z_C and text."""

    model: ModelConfig
    encoders: EncodersConfig
    objective: StageCObjective
    validation: ValidationConfig
    text_mode: str  # the cache's: "embeddings" (cached) or "tokens" (encoded in the step)
    empty_text: np.ndarray  # the encoded "" prompt, float32 (77, c_cond): caption dropout's target
    # Training rows (a numpy batch of `columns`, spread over the cache) whose captions the validation's
    # retrieval samples beside the held-out ones (validation.retrieval_captions); None: held-out only.
    train_probe: dict | None = None
    # A decoder bundle folder (absolute; see validation.decoders): a sample grid at each validation. None: none.
    decoders: str | None = None
    # Built on the worker by setup(), not sent.
    device: torch.device | None = dataclasses.field(default=None, init=False, repr=False)
    text_encoder: nn.Module | None = dataclasses.field(default=None, init=False, repr=False)
    empty: torch.Tensor | None = dataclasses.field(default=None, init=False, repr=False)
    picture_sampler: object = dataclasses.field(default=None, init=False, repr=False)
    reference_pictures: np.ndarray | None = dataclasses.field(default=None, init=False, repr=False)

    @property
    def columns(self) -> list[str]:
        return stage_c_columns(self.text_mode)

    def setup(self, device: torch.device) -> "StageCTask":
        """Builds on this worker what the loss needs: the frozen text encoder (tokens mode), the empty prompt."""
        super().setup(device)
        if self.text_mode == "tokens":
            self.text_encoder = self.encoders.build_text_encoder(self.model.flavor).to(device)
        self.empty = torch.tensor(np.asarray(self.empty_text, dtype=np.float32), device=device)[None]
        if self.decoders is not None and _rank() == 0:  # only rank 0 decodes the validation pictures
            from pipelines import decoder_bundle
            from stages.sampler import WuerstchenSampler

            stage_b, stage_a, text_b, _ = decoder_bundle.load(self.decoders)
            self.picture_sampler = WuerstchenSampler(None, None, stage_b.eval().to(device), text_b.to(device),
                                                     stage_a.eval().to(device))
        return self

    @torch.no_grad()
    def _decode(self, semantic: torch.Tensor, captions: list[str]) -> np.ndarray:
        from pipelines.pictures import to_uint8_images

        sampler = self.picture_sampler
        z_b = sampler.sample_stage_b(semantic, captions, generator=self.validation.seed, progress=False)
        return to_uint8_images(sampler.decode(z_b).float())

    @torch.no_grad()
    def validation_picture(self, model: nn.Module, batches: Iterable[dict]) -> np.ndarray | None:
        """With decoders (validation.decoders): for validation.picture_captions training captions
        spread over the probe, what the decoders make of each one's own cached latent (made once)
        beside what they make of the latent the prior samples from the caption (the validation's prior
        steps, guidance and seed), with the captions: uint8 HWC, on rank 0; None on the other ranks
        (which sample with it: FSDP2's collectives need every rank) and without decoders."""
        if self.decoders is None or self.train_probe is None:
            return None
        from pipelines.pictures import captioned_grid

        v = self.validation
        count = min(v.picture_captions, len(self.train_probe["key"]))
        pick = np.linspace(0, len(self.train_probe["key"]) - 1, count).astype(int)  # spread over the probe
        probe = {name: values[pick] for name, values in self.train_probe.items()}
        captions = [str(c) for c in probe["caption"]]
        _, z_c, text = next(validation_inputs([probe], self.device, self.text_encoder))
        _, sampled = sampled_ranks(model, text, list(range(count)), z_c, self.empty, v.retrieval_steps,
                                   v.retrieval_guidance, v.seed, space=self.objective.latent_space)
        if self.picture_sampler is None:
            return None
        if self.reference_pictures is None:
            self.reference_pictures = self._decode(stage_c_to_semantic(z_c), captions)
        generated = self._decode(stage_c_to_semantic(sampled), captions)
        return captioned_grid(captions, [self.reference_pictures, generated],
                              headers=["decoded from its own cached latent", "sampled from the caption"], per_row=4)

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        """The training loss of one batch of tensors (t, noise and caption dropout drawn from `generator`)."""
        text = text_condition(batch, self.text_encoder)
        return stage_c_loss(model, batch[STAGE_C_LATENTS], text, self.empty, self.objective, generator)

    def validation_loss(self, model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
        """On numpy batches of held-out rows: the fixed-grid, fixed-noise loss (see
        stage_c_validation_loss), whether the prior uses its text ("condition_gap": the same loss with
        each row given the next row's text, minus it; see `condition_gap`) and, with
        validation.retrieval_captions, the caption -> latent retrieval figures (see `retrieval`). The
        loss also falls for a prior that ignores its text; the gap and retrieval do not. The rows and
        the captions are spread over the ranks (each computes its share; the figures are the same)."""
        v = self.validation
        batches = list(batches)
        rows = list(validation_inputs(batches, self.device, self.text_encoder))
        figures = condition_gap(lambda it: stage_c_validation_loss(model, it, v.t_grid, v.seed, self.objective.p2_weighting,
                                                                          self.objective.latent_space), rows, 2)
        return {**figures, **self.retrieval(model, rows)} if v.retrieval_captions else figures

    @torch.no_grad()
    def retrieval(self, model: nn.Module, rows: list[tuple]) -> dict[str, float]:
        """Caption -> latent retrieval (see `pipelines.quality.prior_retrieval`) for
        validation.retrieval_captions held-out captions spread over `rows` (validation_inputs of the
        held-out rows) and the training captions of `train_probe`, with the validation's prior steps,
        guidance and seed: the captions spread over the ranks, each sampling its share."""
        v = self.validation
        figures = retrieval_figures(model, rows, self.train_probe, v.retrieval_captions, self.empty, v.retrieval_steps,
                                    v.retrieval_guidance, v.seed, self.text_encoder, self.objective.latent_space)
        figures.pop("chance_median_rank")
        return figures


@dataclasses.dataclass
class StageBTask(_Task):
    """Training Stage B (the diffusion decoder) on cached Stage A latents, conditioned on the cached
    semantic latents (the semantic compressor frozen: what fine-tuning the public decoder needs) and
    the cached decoder text conditioning, with the recipe's semantic-condition dropout. With
    model.train_semantic_compressor, the compressor is trained with it (a StageBWithCompressor) on
    the cached compressor input images instead of the cached latents."""

    model: ModelConfig
    objective: StageBObjective
    validation: ValidationConfig
    device: torch.device | None = dataclasses.field(default=None, init=False, repr=False)

    @property
    def columns(self) -> list[str]:
        return STAGE_B_WITH_COMPRESSOR_COLUMNS if self.model.train_semantic_compressor else STAGE_B_COLUMNS

    def condition(self, batch: dict) -> torch.Tensor:
        """What the model is conditioned on: e from the cached z_C, or the compressor's input images."""
        if self.model.train_semantic_compressor:
            return batch[SEMANTIC_IMAGES]
        return stage_c_to_semantic(batch[STAGE_C_LATENTS])

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        return stage_b_loss(model, batch[STAGE_A_LATENTS], self.condition(batch), batch[DECODER_TEXT], self.objective,
                            generator, compress=self.model.train_semantic_compressor)

    def validation_loss(self, model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
        """The fixed-grid loss ("loss") and whether the decoder uses its semantic condition
        ("condition_gap", see `condition_gap`: each row given the next held-out row's semantic latent,
        or compressor input, instead of its own), with the rows spread over the ranks."""
        v = self.validation
        rows = [(b["key"], b[STAGE_A_LATENTS], self.condition(b), b[DECODER_TEXT])
                for b in (to_tensors(raw, self.device) for raw in batches)]
        return condition_gap(lambda it: stage_b_validation_loss(model, it, v.t_grid, v.seed, self.objective), rows, 2)


@dataclasses.dataclass
class StageATask(_Task):
    """Training Stage A (the Paella VQGAN) on the cache's cropped training images: pixel
    reconstruction with the codebook and commitment terms; validated by the reconstruction's MSE (the
    loss), PSNR and SSIM on the held-out images."""

    model: ModelConfig
    objective: StageAObjective
    device: torch.device | None = dataclasses.field(default=None, init=False, repr=False)

    columns = STAGE_A_COLUMNS

    def loss(self, model: nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        return stage_a_loss(model, batch[IMAGES], self.objective, generator)

    def validation_loss(self, model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
        images = (to_tensors(raw, self.device)[IMAGES] for raw in batches)
        return stage_a_reconstruction(model, images, self.objective.quantize)

    @torch.no_grad()
    def validation_picture(self, model: nn.Module, batches: Iterable[dict], count: int = 8) -> np.ndarray:
        """The first `count` held-out images (top row) over their reconstructions (bottom row), uint8 HWC."""
        taken = []
        for raw in batches:
            taken.append(to_tensors(raw, self.device)[IMAGES])
            if sum(len(t) for t in taken) >= count:
                break
        originals = torch.cat(taken)[:count]
        was_training = model.training
        model.eval()
        reconstructions, _ = model(originals, quantize=self.objective.quantize)
        model.train(was_training)
        rows = [torch.cat(list(images.float().clamp(0, 1)), dim=2) for images in (originals, reconstructions)]
        return (torch.cat(rows, dim=1).permute(1, 2, 0) * 255).round().byte().cpu().numpy()
