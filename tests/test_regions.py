"""What the trainer applies to a model block by block (pipelines/training/regions.py) and how FSDP2
groups the blocks (parallel.sharding_units): the maths unchanged, the names unchanged, the gradients
laid out as the parameters."""

import pytest
import torch

from conftest import randomize_
from pipelines.training.parallel import sharding_units
from pipelines.training.regions import (ACTIVATION_CHECKPOINTING, channels_last_convolutions, checkpoint_activations,
                                        compile_blocks, prepare_blocks, repeated_blocks)
from stages import StageA, StageB, StageC
from stages.blocks import AttnBlock, ResBlock, ResBlockStageB, TimestepBlock


def _stage_c():
    model = randomize_(StageC.from_flavor("tiny", dropout=0.0), seed=2).train()
    inputs = (torch.randn(2, 16, 4, 4), torch.rand(2), torch.randn(2, 5, 32))
    return model, lambda m: m(*inputs).square().mean()


def _stage_b():
    model = randomize_(StageB.from_flavor("tiny", dropout=0.0), seed=2).train()
    inputs = (torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, 16, 2, 2), torch.randn(2, 3, 32))
    return model, lambda m: m(*inputs).square().mean()


def _stage_a():
    model = StageA.from_flavor("tiny").train()
    images = torch.rand(2, 3, 16, 16)
    return model, lambda m: sum(out.float().square().mean() for out in m(images))


MODELS = {"c": _stage_c, "b": _stage_b, "a": _stage_a}


def _grads(model, loss_of) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    loss = loss_of(model)
    loss.backward()
    return float(loss.detach()), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("stage", sorted(MODELS))
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_keeps_the_gradients_and_the_parameter_names(stage, mode):
    model, loss_of = MODELS[stage]()
    keys = list(model.state_dict())
    plain_loss, plain = _grads(model, loss_of)
    checkpoint_activations(model, mode)
    assert list(model.state_dict()) == keys
    loss, checkpointed = _grads(model, loss_of)
    assert loss == plain_loss
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], atol=1e-6, rtol=1e-5, msg=key)
    with torch.no_grad():  # no recompute to plan without a backward: the plain forward
        assert torch.isfinite(torch.as_tensor(float(loss_of(model))))


def test_activation_checkpointing_modes_are_checked():
    with pytest.raises(ValueError, match=r"activation checkpointing must be one of \('none', 'selective', 'full'\), got 'some'"):
        checkpoint_activations(StageC.from_flavor("tiny"), "some")
    from pipelines.training.config import ModelConfig

    with pytest.raises(ValueError, match="model.activation_checkpointing must be one of"):
        ModelConfig(activation_checkpointing="true")
    assert ACTIVATION_CHECKPOINTING == ("none", "selective", "full")


@pytest.mark.parametrize("stage", sorted(MODELS))
def test_channels_last_convolutions_get_gradients_laid_out_as_their_weights(stage):
    """DDP copies (and warns about) every gradient whose strides differ from its parameter's; the
    trunk turns channels-last after its first block, so contiguous convolution weights get
    channels-last gradients. Before the change some do; after it, none."""
    model, loss_of = MODELS[stage]()
    _, grads = _grads(model, loss_of)
    mismatched = [k for k, p in model.named_parameters() if grads[k].stride() != p.stride()]
    if stage != "a":
        assert mismatched  # what DDP warned about on every run
    channels_last_convolutions(model)
    _, grads = _grads(model, loss_of)
    assert [k for k, p in model.named_parameters() if grads[k].stride() != p.stride()] == []


@pytest.mark.parametrize("stage", sorted(MODELS))
def test_blocks_prepared_for_fsdp2_keep_the_contiguous_parameters_it_shards(stage, tmp_path):
    """FSDP2 refuses a non-contiguous parameter (a channels-last 2x2 convolution weight of Stage B),
    so the trainer prepares its blocks without channels-last under FSDP2; sharded on a one-rank
    group, as the trainer shards them."""
    import torch.distributed as dist

    from pipelines.training.parallel import parallelize

    model, loss_of = MODELS[stage]()
    if stage == "b":  # what the trainer must not hand FSDP2
        assert not all(p.is_contiguous() for p in channels_last_convolutions(MODELS[stage]()[0]).parameters())
    prepare_blocks(model, "selective", channels_last=False)
    assert all(p.is_contiguous() for p in model.parameters())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        sharded = parallelize(model, "fsdp2", torch.device("cpu"))
        assert torch.isfinite(loss_of(sharded))
    finally:
        dist.destroy_process_group()


def test_regional_compile_gives_the_eager_loss_and_gradients():
    """Stage C compiled block by block (with selective checkpointing inside the compiled regions) on
    the CPU, dropout off, fixed seed: the same loss and gradients as eager, the same state-dict keys."""
    from stages.objectives import StageCObjective, stage_c_loss

    def run(compiled: bool):
        torch.manual_seed(0)
        model = prepare_blocks(StageC(StageC.flavor_config("tiny", dropout=0.0)), "selective", compile=compiled).train()
        z, text = torch.randn(4, 16, 6, 6), torch.randn(4, 7, 32)
        loss = stage_c_loss(model, z, text, None, StageCObjective(caption_dropout=0.0), torch.Generator().manual_seed(1))
        loss.backward()
        return model, float(loss.detach()), {k: p.grad for k, p in model.named_parameters()}

    eager, eager_loss, eager_grads = run(False)
    compiled, loss, grads = run(True)
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in repeated_blocks(compiled))
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert loss == pytest.approx(eager_loss, rel=1e-5)
    for key in eager_grads:
        torch.testing.assert_close(grads[key], eager_grads[key], atol=1e-6, rtol=1e-4, msg=key)


def test_fsdp2_units_are_triplets_of_residual_timestep_and_attention_blocks():
    stage_c = StageC.from_flavor("tiny")
    units = sharding_units(stage_c)
    assert len(units) == stage_c.config.depth
    assert all([type(m) for m in unit] == [ResBlock, TimestepBlock, AttnBlock] for unit in units)
    stage_b = StageB.from_flavor("tiny")
    units = sharding_units(stage_b)
    assert all(isinstance(unit[0], ResBlockStageB) and all(isinstance(m, (TimestepBlock, AttnBlock)) for m in unit[1:])
               for unit in units)
    assert sum(len(unit) for unit in units) == len(repeated_blocks(stage_b))  # every block in one unit
    stage_a = StageA.from_flavor("tiny")
    assert [len(unit) for unit in sharding_units(stage_a)] == [1] * len(repeated_blocks(stage_a))


def test_compile_blocks_compiles_only_the_repeated_blocks():
    model = compile_blocks(StageC.from_flavor("tiny"))  # compiling happens at the first call
    assert getattr(model, "_compiled_call_impl", None) is None
    assert all(b._compiled_call_impl is not None for b in repeated_blocks(model))
