"""Text -> image: prompts -> Stage C latents -> Stage B latents -> Stage A image in [0, 1].

The same computation, random draws included, as diffusers' Würstchen prior, decoder and combined
pipelines: given the same generator (or list of them, one per sample), both produce the same images.
"""

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from stages.diffusion import (
    DEFAULT_STAGE_C_TIMESTEPS,
    check_timesteps,
    classifier_free_guidance,
    ddpm_step,
    uniform_timesteps,
    uses_guidance,
)
from stages.latents import (
    LATENT_DIM_SCALE,
    RESOLUTION_MULTIPLE,
    STAGE_A_STRIDE,
    check_image_size,
    stage_b_latent_size,
    stage_b_to_stage_a,
    stage_c_latent_size,
    latent_space as named_latent_space,
)
from stages.stage_a import StageA
from stages.stage_b import StageB
from stages.stage_c import StageC
from stages.text_encoders import ClipTextEncoder

# Defaults of the public recipe (diffusers' docs): prior on DEFAULT_STAGE_C_TIMESTEPS with guidance 4,
# decoder 12 uniform steps without guidance.
PRIOR_GUIDANCE = 4.0
DECODER_STEPS = 12
DECODER_GUIDANCE = 0.0
OUTPUTS = ("image", "semantic", "stage_b")


def _grid(steps: int | None, timesteps: Sequence[float] | None, default: Sequence[float] | None) -> torch.Tensor:
    if steps is not None and timesteps is not None:
        raise ValueError("give either a number of steps or explicit timesteps, not both")
    if timesteps is not None:
        grid = check_timesteps(timesteps)
    elif steps is not None:
        grid = uniform_timesteps(steps)
    else:
        grid = list(default)
    return torch.tensor(grid, dtype=torch.float32)


# What drives a sampler's random draws: a seed, a generator, or (as diffusers takes it) a list of
# generators, one per sample, each drawing that sample's noise: a sample then depends only on its own
# generator, not on the batch it is drawn in.
Generators = torch.Generator | list[torch.Generator] | int | None


def _generator(generator: Generators) -> torch.Generator | list[torch.Generator] | None:
    if isinstance(generator, int):
        return torch.Generator(device="cpu").manual_seed(generator)
    return list(generator) if isinstance(generator, (list, tuple)) else generator


def _randn(shape, generator: torch.Generator | list[torch.Generator] | None, device: torch.device,
           dtype: torch.dtype) -> torch.Tensor:
    # Drawn on the generator's device (CPU for a seed), then moved: the same numbers on every device.
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]} samples: give one per sample")
        if not generator:
            return torch.empty(shape, device=device, dtype=dtype)
        # drawn on the generators' device, then copied to `device` once, not once a sample
        return torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)


class WuerstchenSampler:
    """Holds the stages and their text encoders; Stage B, Stage A and the decoder's text encoder are
    optional when only Stage C latents are wanted, Stage C and its text encoder when only decoding."""

    def __init__(
        self,
        stage_c: StageC | None,
        text_encoder_c: ClipTextEncoder | None,
        stage_b: StageB | None = None,
        text_encoder_b: ClipTextEncoder | None = None,
        stage_a: StageA | None = None,
        resolution_multiple: float = RESOLUTION_MULTIPLE,
        latent_dim_scale: float = LATENT_DIM_SCALE,
        latent_space: str = "v2",
    ):
        if stage_c is not None and text_encoder_c is not None and text_encoder_c.width != stage_c.config.c_cond:
            raise ValueError(
                f"Stage C takes text tokens of width c_cond={stage_c.config.c_cond}; its text encoder gives {text_encoder_c.width}"
            )
        if stage_b is not None and text_encoder_b is not None and text_encoder_b.width != stage_b.config.clip_embd:
            raise ValueError(
                f"Stage B takes text tokens of width clip_embd={stage_b.config.clip_embd}; its text encoder gives {text_encoder_b.width}"
            )
        self.stage_c, self.text_encoder_c = stage_c, text_encoder_c
        self.stage_b, self.text_encoder_b, self.stage_a = stage_b, text_encoder_b, stage_a
        self.resolution_multiple, self.latent_dim_scale = resolution_multiple, latent_dim_scale
        # The prior's diffusion space (stages.latents.LATENT_SPACES); its samples go back to e for Stage B.
        self.latent_space, self.space = latent_space, named_latent_space(latent_space)

    @property
    def has_decoder(self) -> bool:
        return None not in (self.stage_b, self.text_encoder_b, self.stage_a)

    def _text(self, encoder: ClipTextEncoder, prompts: list[str], negative: list[str] | None, guided: bool):
        cond = encoder.encode(prompts)
        if not guided:
            return cond
        uncond = encoder.encode(negative if negative is not None else [""] * len(prompts))
        return torch.cat([cond, uncond])

    def _denoise(self, model_call, latents, grid, guidance, generator, progress, desc):
        guided = uses_guidance(guidance)
        for t, t_prev in tqdm(list(zip(grid[:-1], grid[1:])), desc=desc, disable=not progress, leave=False):
            r = t.expand(latents.shape[0]).to(latents.device, latents.dtype)
            eps = model_call(torch.cat([latents] * 2) if guided else latents, torch.cat([r] * 2) if guided else r)
            if guided:
                eps_cond, eps_uncond = eps.chunk(2)
                eps = classifier_free_guidance(eps_cond, eps_uncond, guidance)
            noise = _randn(eps.shape, generator, eps.device, eps.dtype)  # drawn at every step, as diffusers does
            latents = ddpm_step(eps, r, t_prev.expand(latents.shape[0]).to(r), latents, noise)
        return latents

    @torch.no_grad()
    def sample_stage_c(
        self,
        prompts: list[str],
        height: int = 1024,
        width: int = 1024,
        steps: int | None = None,
        timesteps: Sequence[float] | None = None,
        guidance: float = PRIOR_GUIDANCE,
        negative_prompts: list[str] | None = None,
        generator: Generators = None,
        latents: torch.Tensor | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """Semantic latents e (B, 16, ceil(H/42.67), ceil(W/42.67)), what Stage B takes: the prior's
        samples mapped back from its latent space (e = 42 z_C - 1 for the v2 space)."""
        if self.stage_c is None or self.text_encoder_c is None:
            raise ValueError("this sampler has no Stage C (prior) or no prior text encoder")
        prompts = _prompt_list(prompts)
        check_image_size(height, width)
        generator = _generator(generator)
        guided = uses_guidance(guidance)
        text = self._text(self.text_encoder_c, prompts, _prompt_list(negative_prompts, len(prompts)), guided)
        shape = (len(prompts), self.stage_c.config.c_in, *stage_c_latent_size(height, width, self.resolution_multiple))
        cond, uncond = text.chunk(2) if guided else (text, None)
        return self.space.to_semantic(self.sample_z_c(cond, uncond, shape, steps, timesteps, guidance, generator, latents, progress))

    @torch.no_grad()
    def sample_z_c(
        self,
        text: torch.Tensor,
        negative_text: torch.Tensor | None,
        shape: Sequence[int],
        steps: int | None = None,
        timesteps: Sequence[float] | None = None,
        guidance: float = PRIOR_GUIDANCE,
        generator: Generators = None,
        latents: torch.Tensor | None = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Stage C's latents z_C of `shape` (B, 16, h, w) from text conditioning already encoded: `text`
        (B, L, c_cond) and, with guidance, `negative_text` (the encoded negative or "" prompts), as
        cached or encoded by the caller (the trainer's validation samples from cached embeddings).
        Needs no text encoder; `stage_c` may be wrapped for data parallelism."""
        generator = _generator(generator)
        device = next(self.stage_c.parameters()).device
        guided = uses_guidance(guidance)
        if guided and negative_text is None:
            raise ValueError("guidance needs the negative text conditioning (the encoded \"\" prompt, for none)")
        text = (torch.cat([text, negative_text]) if guided else text).to(device)
        latents = _initial(latents, tuple(shape), generator, device, text.dtype)
        grid = _grid(steps, timesteps, DEFAULT_STAGE_C_TIMESTEPS).to(device)
        return self._denoise(lambda x, r: self.stage_c(x, r, text), latents, grid, guidance, generator, progress, "Stage C")

    @torch.no_grad()
    def sample_stage_b(
        self,
        semantic: torch.Tensor,
        prompts: list[str],
        steps: int | None = None,
        timesteps: Sequence[float] | None = None,
        guidance: float = DECODER_GUIDANCE,
        negative_prompts: list[str] | None = None,
        generator: Generators = None,
        latents: torch.Tensor | None = None,
        progress: bool = True,
        size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """Stage B latents z_B for semantic latents e: of the image `size` (height, width) asked,
        (B, 4, H / 4, W / 4) (what Stage A decodes to that size; an aspect-ratio bucket's Stage A
        latents); without it, (B, 4, int(h 10.67), int(w 10.67)) of e's grid (h, w), diffusers' rule,
        the same on multiples of 128 px."""
        if self.stage_b is None or self.text_encoder_b is None:
            raise ValueError("this sampler has no Stage B (decoder) or no decoder text encoder")
        prompts = _prompt_list(prompts)
        if semantic.shape[0] != len(prompts):
            raise ValueError(f"{semantic.shape[0]} semantic latents for {len(prompts)} prompts")
        generator = _generator(generator)
        device = next(self.stage_b.parameters()).device
        dtype = next(self.stage_b.parameters()).dtype
        guided = uses_guidance(guidance)
        text = self._text(self.text_encoder_b, prompts, _prompt_list(negative_prompts, len(prompts)), guided).to(device)
        semantic = semantic.to(device, dtype)
        effnet = torch.cat([semantic, torch.zeros_like(semantic)]) if guided else semantic
        grid = stage_b_latent_size(*semantic.shape[-2:], self.latent_dim_scale)
        if size is not None and self.latent_dim_scale == LATENT_DIM_SCALE:
            grid = (size[0] // STAGE_A_STRIDE, size[1] // STAGE_A_STRIDE)
        shape = (semantic.shape[0], self.stage_b.config.c_in, *grid)
        latents = _initial(latents, shape, generator, device, dtype)
        grid = _grid(steps, timesteps, uniform_timesteps(DECODER_STEPS))
        return self._denoise(
            lambda x, r: self.stage_b(x, r, effnet, text), latents, grid.to(device), guidance, generator, progress, "Stage B"
        )

    @torch.no_grad()
    def decode(self, stage_b_latents: torch.Tensor) -> torch.Tensor:
        """Stage B latents -> images (B, 3, H, W) in [0, 1] through Stage A, without quantization."""
        if self.stage_a is None:
            raise ValueError("this sampler has no Stage A (VQGAN)")
        h = stage_b_to_stage_a(stage_b_latents, self.stage_a.config.scale_factor)
        return self.stage_a.decode(h).clamp(0, 1)

    @torch.no_grad()
    def __call__(
        self,
        prompts: list[str] | str,
        height: int = 1024,
        width: int = 1024,
        prior_steps: int | None = None,
        prior_timesteps: Sequence[float] | None = None,
        prior_guidance: float = PRIOR_GUIDANCE,
        decoder_steps: int | None = None,
        decoder_timesteps: Sequence[float] | None = None,
        decoder_guidance: float = DECODER_GUIDANCE,
        negative_prompts: list[str] | str | None = None,
        generator: Generators = None,
        prior_latents: torch.Tensor | None = None,
        output: str = "image",
        progress: bool = True,
    ) -> torch.Tensor:
        """`output`: "image" (B, 3, H, W) in [0, 1]; "semantic" stops after Stage C and returns e;
        "stage_b" returns the Stage B latents. One generator (or seed) drives every random draw; or
        one generator per prompt drives each sample's."""
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        if output != "semantic" and not self.has_decoder:
            raise ValueError(f"output={output!r} needs Stage B, its text encoder and Stage A; this sampler has only Stage C")
        prompts = _prompt_list(prompts)
        generator = _generator(generator)
        semantic = self.sample_stage_c(
            prompts, height, width, prior_steps, prior_timesteps, prior_guidance, negative_prompts, generator,
            prior_latents, progress,
        )
        if output == "semantic":
            return semantic
        z_b = self.sample_stage_b(
            semantic, prompts, decoder_steps, decoder_timesteps, decoder_guidance, negative_prompts, generator,
            progress=progress, size=(height, width),
        )
        return z_b if output == "stage_b" else self.decode(z_b)


def _prompt_list(prompts, expected: int | None = None) -> list[str] | None:
    if prompts is None:
        return None
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a non-empty list of strings, got {prompts!r}")
    if expected is not None and len(prompts) != expected:
        if len(prompts) == 1:
            return prompts * expected
        raise ValueError(f"{len(prompts)} negative prompts for {expected} prompts")
    return prompts


def _initial(latents, shape, generator, device, dtype) -> torch.Tensor:
    if latents is None:
        return _randn(shape, generator, device, dtype)
    if tuple(latents.shape) != tuple(shape):
        raise ValueError(f"initial latents have shape {tuple(latents.shape)}, expected {tuple(shape)}")
    return latents.to(device, dtype)
