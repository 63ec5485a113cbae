"""The building blocks that Stage C and Stage B share (Würstchen v2, diffusers key layout).

Every parameter name here is the one in the public diffusers checkpoints, so a state dict
saved by diffusers loads without renaming (see WUERSTCHEN_SPEC.md section 2).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

# eps of every affine-free LayerNorm in Stage B and Stage C (the checkpoints were trained with it).
LAYER_NORM_EPS = 1e-6


def gen_r_embedding(r: torch.Tensor, c_r: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of the continuous noise level r in [0, 1] (1 = pure noise).

    Not the usual integer-timestep embedding: r is scaled by 10000, the frequency divisor is
    (half - 1), and sin comes before cos. Odd c_r is zero-padded.
    """
    r = r * max_positions
    half = c_r // 2
    freqs = torch.arange(half, device=r.device).float().mul(-math.log(max_positions) / (half - 1)).exp()
    angles = r[:, None] * freqs[None, :]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    if c_r % 2 == 1:
        emb = F.pad(emb, (0, 1), mode="constant")
    return emb.to(dtype=r.dtype)


class LayerNorm2d(nn.Module):
    """LayerNorm over the channel axis at every pixel; no affine parameters. The output has the
    input's dtype: under autocast layer_norm computes in float32 and would hand float32 on to the
    trunk (twice the bytes through every following elementwise op and the attention's tokens)."""

    def __init__(self, c: int, eps: float = LAYER_NORM_EPS):
        super().__init__()
        self.c = c
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = F.layer_norm(x.permute(0, 2, 3, 1), (self.c,), eps=self.eps).to(x.dtype)
        return normed.permute(0, 3, 1, 2)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN on channels-last input; gamma and beta start at zero (identity). The norm is
    taken in float32, the response applied in the input's dtype (under autocast, the compute dtype)."""

    def __init__(self, c: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, c))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.linalg.vector_norm(x, 2, dim=(1, 2), keepdim=True, dtype=torch.float32)
        n = (g / (g.mean(dim=-1, keepdim=True) + 1e-6)).to(x.dtype)
        return self.gamma.to(x.dtype) * (x * n) + self.beta.to(x.dtype) + x


def _channelwise(c_in: int, c: int, dropout: float) -> nn.Sequential:
    # Keys channelwise.{0,2,4}: Linear, GELU, GRN, Dropout, Linear.
    return nn.Sequential(
        nn.Linear(c_in, c * 4), nn.GELU(), GlobalResponseNorm(c * 4), nn.Dropout(dropout), nn.Linear(c * 4, c)
    )


class ResBlock(nn.Module):
    """Stage C ResBlock: the skip (if any) is concatenated before the depthwise conv."""

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c + c_skip, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c)
        self.channelwise = _channelwise(c, c, dropout)

    def forward(self, x: torch.Tensor, x_skip: torch.Tensor | None = None) -> torch.Tensor:
        x_res = x
        if x_skip is not None:
            x = torch.cat([x, x_skip], dim=1)
        x = self.norm(self.depthwise(x)).permute(0, 2, 3, 1)
        return self.channelwise(x).permute(0, 3, 1, 2) + x_res


class ResBlockStageB(nn.Module):
    """Stage B ResBlock: depthwise conv and LN first, then the skip is concatenated (channels)."""

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0):
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size=kernel_size, padding=kernel_size // 2, groups=c)
        self.norm = LayerNorm2d(c)
        self.channelwise = _channelwise(c + c_skip, c, dropout)

    def forward(self, x: torch.Tensor, x_skip: torch.Tensor | None = None) -> torch.Tensor:
        x_res = x
        x = self.norm(self.depthwise(x))
        if x_skip is not None:
            x = torch.cat([x, x_skip], dim=1)
        return self.channelwise(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) + x_res


class TimestepBlock(nn.Module):
    """Modulates x with the r-embedding: x * (1 + a) + b."""

    def __init__(self, c: int, c_r: int):
        super().__init__()
        self.mapper = nn.Linear(c_r, c * 2)

    def forward(self, x: torch.Tensor, r_embed: torch.Tensor) -> torch.Tensor:
        a, b = self.mapper(r_embed)[:, :, None, None].chunk(2, dim=1)
        return x * (1 + a) + b


class Attention(nn.Module):
    """Multi-head attention with biased q/k/v/out projections (keys to_q, to_k, to_v, to_out.0).

    Dropout acts on the attention probabilities, as in the original training code.
    """

    def __init__(self, c: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        if c % nhead != 0:
            raise ValueError(f"attention width c={c} is not divisible by nhead={nhead}")
        self.nhead = nhead
        self.dropout = dropout
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c)])

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, c = t.shape
        return t.view(b, n, self.nhead, c // self.nhead).transpose(1, 2)

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(kv)), self._heads(self.to_v(kv))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, c))


class AttnBlock(nn.Module):
    """Joint self + cross attention: keys and values are the normed image tokens followed by the
    mapped conditioning tokens."""

    def __init__(self, c: int, c_cond: int, nhead: int, self_attn: bool = True, dropout: float = 0.0):
        super().__init__()
        self.self_attn = self_attn
        self.norm = LayerNorm2d(c)
        self.attention = Attention(c, nhead, dropout=dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def forward(self, x: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        kv = self.kv_mapper(kv)
        b, c, h, w = x.shape
        tokens = self.norm(x).view(b, c, h * w).transpose(1, 2)
        if self.self_attn:
            kv = torch.cat([tokens, kv], dim=1)
        out = self.attention(tokens, kv)
        return x + out.transpose(1, 2).reshape(b, c, h, w)
