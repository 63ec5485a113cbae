"""The `v2` flavors have exactly the tensors of the public checkpoints (built on the meta device)."""

import pytest
import torch
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
from torchvision.models import efficientnet_v2_s

from stages import SemanticCompressor, StageA, StageB, StageC

# Public configs (warp-ai/wuerstchen-prior prior/config.json, warp-ai/wuerstchen decoder/ and vqgan/config.json).
PRIOR_CONFIG = dict(c_in=16, c=1536, c_cond=1280, c_r=64, depth=32, nhead=24, dropout=0.1)
DECODER_CONFIG = dict(
    c_in=4, c_out=4, c_r=64, patch_size=2, c_cond=1024, c_hidden=[320, 640, 1280, 1280], nhead=[-1, 10, 20, 20],
    blocks=[4, 4, 14, 4], level_config=["CT", "CTA", "CTA", "CTA"], inject_effnet=[False, True, True, True],
    effnet_embd=16, clip_embd=1024, kernel_size=3, dropout=0.1,
)
VQGAN_CONFIG = dict(
    in_channels=3, out_channels=3, up_down_scale_factor=2, levels=2, bottleneck_blocks=12, embed_dim=384,
    latent_channels=4, num_vq_embeddings=8192, scale_factor=0.3764,
)


def _shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    "ours_cls, theirs_cls, config, tensors, params",
    [
        (StageC, WuerstchenPrior, PRIOR_CONFIG, 648, 993_636_896),
        (StageB, WuerstchenDiffNeXt, DECODER_CONFIG, 990, 1_055_365_280),
        (StageA, PaellaVQModel, VQGAN_CONFIG, 122, None),
    ],
    ids=["prior", "decoder", "vqgan"],
)
def test_v2_flavor_has_the_public_checkpoint_tensors(ours_cls, theirs_cls, config, tensors, params):
    with torch.device("meta"):
        ours = ours_cls.from_flavor("v2")
        theirs = theirs_cls(**config)
    assert all(p.is_meta for p in ours.parameters())
    assert len(ours.state_dict()) == tensors
    assert _shapes(ours) == _shapes(theirs)
    if params is not None:
        assert ours.num_parameters() == params


def test_v2_semantic_compressor_has_the_original_effnet_keys():
    """The original `effnet_state_dict` is torchvision's efficientnet_v2_s().features under `backbone.`
    plus `mapper.0` (1x1 conv 1280->16, no bias) and `mapper.1` (BatchNorm2d(16), affine)."""
    with torch.device("meta"):
        ours = SemanticCompressor.from_flavor("v2")
        features = efficientnet_v2_s(weights=None).features
    expected = {f"backbone.{k}": tuple(v.shape) for k, v in features.state_dict().items()}
    expected.update(
        {
            "mapper.0.weight": (16, 1280, 1, 1),
            "mapper.1.weight": (16,),
            "mapper.1.bias": (16,),
            "mapper.1.running_mean": (16,),
            "mapper.1.running_var": (16,),
            "mapper.1.num_batches_tracked": (),
        }
    )
    assert _shapes(ours) == expected


def test_flavor_sizes():
    """tiny is for fast tests (well under 1M parameters), small for CPU demos (a few M)."""
    for cls in (StageC, StageB, StageA, SemanticCompressor):
        assert cls.from_flavor("tiny").num_parameters() < 100_000
        assert cls.from_flavor("small").num_parameters() < 5_000_000
    assert StageC.from_flavor("small").num_parameters() > 1_000_000


def test_unknown_flavor_names_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown StageC flavor 'huge'.*\['small', 'tiny', 'v2'\]"):
        StageC.from_flavor("huge")


def test_flavor_overrides_replace_single_fields():
    model = StageC.from_flavor("tiny", c_cond=48, depth=1)
    assert (model.config.c_cond, model.config.depth, model.config.c) == (48, 1, 32)
    assert model.cond_mapper[0].in_features == 48
