"""`FusedAttention`: multi-head (and grouped-query) self-attention, batch first,
`(B, T, E) → (B, T, E)`, whose attention runs `kitsune.ops.attention.attention`
(Kitsune's flash kernel or SDPA, chosen by measurement on CUDA; the reference on
the CPU). Parameters are four nn.Linear children, `q_proj`, `k_proj`, `v_proj`
(k/v project to num_kv_heads × head_dim) and `out_proj`."""
from __future__ import annotations

import torch
from torch import nn

from kitsune.nn._util import check_positive_int, check_probability
from kitsune.ops.attention import attention


class FusedAttention(nn.Module):
    """FusedAttention(embed_dim, num_heads, num_kv_heads=None, causal=False, bias=True, dropout=0.0).

    forward(x, attn_mask=None): x [B, T, E]; attn_mask (optional) broadcasts to
    [B, num_heads, T, T]: bool (True keeps) or float (added to the scores)."""

    def __init__(self, embed_dim: int, num_heads: int, num_kv_heads: int | None = None, causal: bool = False,
                 bias: bool = True, dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        check_positive_int(embed_dim, "embed_dim", "FusedAttention")
        check_positive_int(num_heads, "num_heads", "FusedAttention")
        if embed_dim % num_heads:
            raise ValueError(f"FusedAttention: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        check_positive_int(num_kv_heads, "num_kv_heads", "FusedAttention")
        if num_heads % num_kv_heads:
            raise ValueError(f"FusedAttention: num_heads ({num_heads}) must be a multiple of num_kv_heads "
                             f"({num_kv_heads})")
        for name, flag in (("causal", causal), ("bias", bias)):
            if not isinstance(flag, bool):
                raise TypeError(f"FusedAttention: {name} must be a bool, got {type(flag).__name__}")
        self.embed_dim, self.num_heads, self.num_kv_heads = embed_dim, num_heads, num_kv_heads
        self.head_dim = embed_dim // num_heads
        self.causal = causal
        self.dropout = check_probability(dropout, "dropout", "FusedAttention")
        factory = {"device": device, "dtype": dtype}
        kv_dim = num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(embed_dim, kv_dim, bias=bias, **factory)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention, causal: bool = False) -> "FusedAttention":
        """From an nn.MultiheadAttention (batch_first, one embed_dim for q/k/v): copies of its
        in_proj (split into q/k/v) and out_proj weights."""
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"FusedAttention.from_module: mha must be an nn.MultiheadAttention, "
                            f"got {type(mha).__name__}")
        if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError("FusedAttention.from_module: mha must have kdim == vdim == embed_dim, "
                             "no add_bias_kv and no add_zero_attn")
        if not mha.batch_first:
            raise ValueError("FusedAttention.from_module: mha must be batch_first (FusedAttention is)")
        weight = mha.in_proj_weight
        layer = cls(mha.embed_dim, mha.num_heads, causal=causal, bias=mha.in_proj_bias is not None,
                    dropout=mha.dropout, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            for i, proj in enumerate((layer.q_proj, layer.k_proj, layer.v_proj)):
                proj.weight.copy_(weight[i * mha.embed_dim:(i + 1) * mha.embed_dim])
                if proj.bias is not None:
                    proj.bias.copy_(mha.in_proj_bias[i * mha.embed_dim:(i + 1) * mha.embed_dim])
            layer.out_proj.weight.copy_(mha.out_proj.weight)
            if layer.out_proj.bias is not None:
                layer.out_proj.bias.copy_(mha.out_proj.bias)
        return layer

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.embed_dim:
            raise ValueError(f"FusedAttention: x must be [B, T, {self.embed_dim}], got shape {tuple(x.shape)}")
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        mask = bias = None
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                mask = attn_mask
            else:
                bias = attn_mask
        out = attention(q, k, v, bias=bias, mask=mask, causal=self.causal,
                        dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, self.embed_dim))

    def extra_repr(self) -> str:
        return (f"embed_dim={self.embed_dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
                f"causal={self.causal}, dropout={self.dropout}")
