"""The shared blocks, checked against the formulas of the spec (not against another implementation)."""

import math

import torch
from conftest import randomize_

from stages import StageB, StageC
from stages.blocks import AttnBlock, GlobalResponseNorm, LayerNorm2d, ResBlock, ResBlockStageB, TimestepBlock, gen_r_embedding


def test_r_embedding_formula():
    r = torch.tensor([0.0, 0.25, 1.0])
    emb = gen_r_embedding(r, c_r=64)
    k = torch.arange(32, dtype=torch.float64)
    angles = 10000 * r.double()[:, None] * torch.exp(-k * math.log(10000) / 31)[None]
    expected = torch.cat([angles.sin(), angles.cos()], dim=1)  # sin first
    torch.testing.assert_close(emb.double(), expected, atol=2e-3, rtol=0)  # fp32 angles up to 1e4 rad
    assert emb[0, :32].abs().max() == 0 and torch.all(emb[0, 32:] == 1)


def test_r_embedding_odd_width_is_zero_padded():
    emb = gen_r_embedding(torch.rand(4), c_r=7)
    assert emb.shape == (4, 7) and torch.all(emb[:, -1] == 0)


def test_layer_norm_2d_normalises_channels_without_parameters():
    norm = LayerNorm2d(8)
    x = torch.randn(2, 8, 3, 5) * 3 + 1
    y = norm(x)
    torch.testing.assert_close(y.mean(dim=1), torch.zeros(2, 3, 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var(dim=1, unbiased=False), torch.ones(2, 3, 5), atol=1e-4, rtol=0)
    assert list(norm.parameters()) == []


def test_global_response_norm_formula():
    grn = GlobalResponseNorm(6)
    assert torch.equal(grn(torch.ones(1, 2, 2, 6)), torch.ones(1, 2, 2, 6))  # identity at init
    torch.nn.init.normal_(grn.gamma)
    torch.nn.init.normal_(grn.beta)
    x = torch.randn(2, 4, 3, 6)
    g = x.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
    n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(grn(x), grn.gamma * x * n + grn.beta + x)


def test_attention_is_joint_self_and_cross_attention():
    """Reference: nn.MultiheadAttention (what the original checkpoints used) over [image tokens; cond]."""
    block = randomize_(AttnBlock(c=16, c_cond=12, nhead=4), seed=1).eval()
    mha = torch.nn.MultiheadAttention(16, 4, batch_first=True)
    att = block.attention
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([att.to_q.weight, att.to_k.weight, att.to_v.weight]))
        mha.in_proj_bias.copy_(torch.cat([att.to_q.bias, att.to_k.bias, att.to_v.bias]))
        mha.out_proj.weight.copy_(att.to_out[0].weight)
        mha.out_proj.bias.copy_(att.to_out[0].bias)
    x, cond = torch.randn(2, 16, 3, 4), torch.randn(2, 5, 12)
    tokens = LayerNorm2d(16)(x).flatten(2).transpose(1, 2)
    kv = torch.cat([tokens, block.kv_mapper(cond)], dim=1)
    expected = x + mha(tokens, kv, kv, need_weights=False)[0].transpose(1, 2).reshape(2, 16, 3, 4)
    with torch.no_grad():
        torch.testing.assert_close(block(x, cond), expected, atol=1e-5, rtol=1e-5)


def test_resblock_variants_place_the_skip_differently():
    c_block, b_block = ResBlock(8, c_skip=8), ResBlockStageB(8, c_skip=4)
    assert c_block.depthwise.in_channels == 16 and c_block.channelwise[0].in_features == 8
    assert b_block.depthwise.in_channels == 8 and b_block.channelwise[0].in_features == 12
    x = torch.randn(1, 8, 4, 4)
    assert c_block(x, torch.randn(1, 8, 4, 4)).shape == b_block(x, torch.randn(1, 4, 4, 4)).shape == x.shape


def test_dropout_acts_in_training_only():
    model = randomize_(StageC.from_flavor("tiny", dropout=0.5), seed=3)
    x, r, c = torch.randn(1, 16, 4, 4), torch.rand(1), torch.randn(1, 5, 32)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(x, r, c), model(x, r, c))
        model.train()
        assert not torch.equal(model(x, r, c), model(x, r, c))


def test_under_bf16_autocast_the_trunk_stays_in_bf16():
    """Autocast computes layer_norm and the GRN's norm in float32; their outputs go on in the compute
    dtype (no float32 chains through the trunk or the attention's tokens), close to float32's."""
    model = randomize_(StageC.from_flavor("tiny", dropout=0.0), seed=4, std=0.05).eval()
    x, r, c = torch.randn(2, 16, 6, 6), torch.rand(2), torch.randn(2, 5, 32)
    dtypes = {}
    for name, module in model.named_modules():
        if isinstance(module, (ResBlock, TimestepBlock, AttnBlock, LayerNorm2d, GlobalResponseNorm)):
            module.register_forward_hook(lambda m, args, out, name=name: dtypes.__setitem__(name, out.dtype))
    with torch.no_grad():
        reference = model(x, r, c)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, r, c)
    assert set(dtypes.values()) == {torch.bfloat16}, {k: v for k, v in dtypes.items() if v != torch.bfloat16}
    assert float((low.float() - reference).norm() / reference.norm()) < 0.02
