"""Weight and output parity with diffusers' (deprecated) Würstchen classes, in both directions."""

import json

import pytest
import torch
from conftest import random_stage_a_kwargs, random_stage_b_kwargs, random_stage_c_kwargs, randomize_
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior

from stages import StageA, StageAConfig, StageB, StageBConfig, StageC, StageCConfig

SEEDS = [0, 1, 2, 3]
TOL = dict(atol=1e-5, rtol=1e-4)


def _assert_same_keys(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    assert sorted(set(a) - set(b)) == [] and sorted(set(b) - set(a)) == []
    assert a == b


def _stage_c_inputs(kwargs: dict, gen: torch.Generator):
    x = torch.randn(2, kwargs["c_in"], 5, 7, generator=gen)
    r = torch.rand(2, generator=gen)
    c = torch.randn(2, 9, kwargs["c_cond"], generator=gen)
    return x, r, c


def _stage_b_inputs(kwargs: dict, gen: torch.Generator):
    side = kwargs["patch_size"] * 2 ** (len(kwargs["c_hidden"]) - 1) * 3
    x = torch.randn(2, kwargs["c_in"], side, side + kwargs["patch_size"] * 2 ** (len(kwargs["c_hidden"]) - 1), generator=gen)
    r = torch.rand(2, generator=gen)
    effnet = torch.randn(2, kwargs["effnet_embd"], 3, 4, generator=gen)
    clip = torch.randn(2, 6, kwargs["clip_embd"], generator=gen)
    return x, r, effnet, clip


# (our class, our config, diffusers' class, random kwargs, inputs) for the two denoisers
DENOISERS = {
    "stage_c": (StageC, StageCConfig, WuerstchenPrior, random_stage_c_kwargs, _stage_c_inputs),
    "stage_b": (StageB, StageBConfig, WuerstchenDiffNeXt, random_stage_b_kwargs, _stage_b_inputs),
}


@pytest.mark.parametrize("stage", sorted(DENOISERS))
@pytest.mark.parametrize("seed", SEEDS)
def test_loads_diffusers_weights_and_matches_outputs(stage, seed, tmp_path):
    ours_cls, config_cls, theirs_cls, random_kwargs, make_inputs = DENOISERS[stage]
    kwargs = random_kwargs(seed)
    theirs = randomize_(theirs_cls(**kwargs), seed).eval()
    theirs.save_pretrained(tmp_path)
    ours = ours_cls.from_pretrained(tmp_path)
    assert ours.config == config_cls(**kwargs)
    _assert_same_keys(ours, theirs)
    inputs = make_inputs(kwargs, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(ours(*inputs), theirs(*inputs), **TOL)


@pytest.mark.parametrize("stage", sorted(DENOISERS))
@pytest.mark.parametrize("seed", SEEDS)
def test_saved_by_us_loads_into_diffusers(stage, seed, tmp_path):
    ours_cls, config_cls, theirs_cls, random_kwargs, make_inputs = DENOISERS[stage]
    kwargs = random_kwargs(seed + 100)
    ours = randomize_(ours_cls(config_cls(**kwargs)), seed).eval()
    ours.save_pretrained(tmp_path)
    theirs = theirs_cls.from_pretrained(tmp_path).eval()
    assert {k: theirs.config[k] for k in kwargs} == kwargs
    inputs = make_inputs(kwargs, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch.testing.assert_close(ours(*inputs), theirs(*inputs), **TOL)


def _compare_stage_a(ours: StageA, theirs: PaellaVQModel, kwargs: dict, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    side = kwargs["up_down_scale_factor"] * 2 ** (kwargs["levels"] - 1) * 4
    images = torch.rand(2, 3, side, side * 2, generator=gen)
    with torch.no_grad():
        h = ours.encode(images)
        torch.testing.assert_close(h, theirs.encode(images).latents, **TOL)
        torch.testing.assert_close(ours.decode(h), theirs.decode(h).sample, **TOL)
        torch.testing.assert_close(
            ours.decode(h, quantize=True), theirs.decode(h, force_not_quantize=False).sample, **TOL
        )


@pytest.mark.parametrize("seed", SEEDS)
def test_stage_a_loads_diffusers_weights_and_matches_outputs(seed, tmp_path):
    kwargs = random_stage_a_kwargs(seed)
    theirs = randomize_(PaellaVQModel(**kwargs), seed).eval()
    theirs.save_pretrained(tmp_path)
    ours = StageA.from_pretrained(tmp_path)
    assert ours.config == StageAConfig(**kwargs)
    _assert_same_keys(ours, theirs)
    _compare_stage_a(ours, theirs, kwargs, seed)


@pytest.mark.parametrize("seed", SEEDS)
def test_stage_a_saved_by_us_loads_into_diffusers(seed, tmp_path):
    kwargs = random_stage_a_kwargs(seed + 100)
    ours = randomize_(StageA(StageAConfig(**kwargs)), seed).eval()
    ours.save_pretrained(tmp_path)
    theirs = PaellaVQModel.from_pretrained(tmp_path).eval()
    assert {k: theirs.config[k] for k in kwargs} == kwargs
    _compare_stage_a(ours, theirs, kwargs, seed)


def test_written_config_names_the_diffusers_class(tmp_path):
    StageC.from_flavor("tiny").save_pretrained(tmp_path / "prior")
    StageB.from_flavor("tiny").save_pretrained(tmp_path / "decoder")
    StageA.from_flavor("tiny").save_pretrained(tmp_path / "vqgan")
    names = {sub: json.loads((tmp_path / sub / "config.json").read_text())["_class_name"] for sub in ("prior", "decoder", "vqgan")}
    assert names == {"prior": "WuerstchenPrior", "decoder": "WuerstchenDiffNeXt", "vqgan": "PaellaVQModel"}


def test_a_config_without_a_key_takes_the_diffusers_class_default(tmp_path):
    """diffusers fills keys an older config.json lacks with its class defaults, which for the prior
    are not the public checkpoint's: we must do the same, or the weights would not fit."""
    theirs = WuerstchenPrior(c=32, c_cond=16, depth=1, nhead=2)  # c_r and c_in from the class defaults
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["c_r"], config["c_in"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = StageC.from_pretrained(tmp_path)
    assert (ours.config.c_in, ours.config.c_r) == (16, 64)
