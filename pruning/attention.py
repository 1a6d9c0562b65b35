"""Multi-head attention whose heads can be fewer than its width allows: nn.MultiheadAttention's
call, arguments and results, with the query, key, value and output projections as nn.Linear
layers of inner width heads x head_dim. nn.MultiheadAttention ties that inner width to the
model's, so removing heads needs this module; from_multihead makes one with the same weights
and the same outputs."""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    """Attention of `heads` heads of `head_dim` features each over inputs of `width` features
    (keys and values of key_width and value_width, by default width), as nn.MultiheadAttention
    computes it: each head softmax(q k^T / sqrt(head_dim)) v, the heads side by side, then the
    output projection back to `width`.

    Args:
        width: the query's and the output's features (nn.MultiheadAttention's embed_dim).
        heads: how many heads.
        head_dim: features per head (nn.MultiheadAttention: embed_dim // num_heads).
        bias: biases in the four projections.
        dropout: dropout on the attention weights while training.
        batch_first: inputs and output (batch, sequence, features), else (sequence, batch, features).

    Example:
        >>> attention = Attention(64, heads=2, head_dim=16, batch_first=True)
        >>> out, _ = attention(x, x, x, need_weights=False)
    """

    in_proj_weight = in_proj_bias = None  # what PyTorch's encoder layers check before their fused path: not taken

    def __init__(self, width: int, *, heads: int, head_dim: int, key_width: int | None = None,
                 value_width: int | None = None, bias: bool = True, dropout: float = 0.0, batch_first: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim = width, heads, head_dim
        self.dropout, self.batch_first = dropout, batch_first
        self.q_proj = nn.Linear(width, inner, bias=bias)
        self.k_proj = nn.Linear(key_width or width, inner, bias=bias)
        self.v_proj = nn.Linear(value_width or width, inner, bias=bias)
        self.out_proj = nn.Linear(inner, width, bias=bias)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query[None], key[None], value[None]
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[None]
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        (n, length, _), source = query.shape, key.shape[1]
        q, k, v = (proj(t).view(n, -1, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj, t in ((self.q_proj, query), (self.k_proj, key), (self.v_proj, value)))
        mask = additive_mask(attn_mask, key_padding_mask, n, self.num_heads, length, source, q.dtype, is_causal)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
            weights = torch.softmax(scores if mask is None else scores + mask, -1)
            heads = F.dropout(weights, dropout, self.training) @ v
        else:
            weights = None
            heads = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.out_proj(heads.transpose(1, 2).reshape(n, length, self.num_heads * self.head_dim))
        if weights is not None and average_attn_weights:
            weights = weights.mean(1)
        if unbatched:
            return out[0], None if weights is None else weights[0]
        return (out if self.batch_first else out.transpose(0, 1)), weights


def additive_mask(attn_mask, key_padding_mask, n, heads, length, source, dtype, is_causal):
    """nn.MultiheadAttention's masks (True or -inf: not attended) as one float mask added to the
    scores, (n or 1, heads or 1, length, source), or None where there is none."""
    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, source, dtype=torch.bool).triu(1)
    mask = None
    for m, shape in ((attn_mask, None), (key_padding_mask, (n, 1, 1, source))):
        if m is None:
            continue
        m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf")) \
            if m.dtype == torch.bool else m.to(dtype)
        if shape is None:
            shape = (1, 1, length, source) if m.dim() == 2 else (n, heads, length, source)
        m = m.reshape(shape)
        mask = m if mask is None else mask + m
    return mask


@torch.no_grad()
def from_multihead(mha: nn.MultiheadAttention) -> Attention:
    """An Attention computing what mha computes, with its weights (copied), in its mode and dtype."""
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("nn.MultiheadAttention with add_bias_kv or add_zero_attn has no heads this library removes")
    width, heads = mha.embed_dim, mha.num_heads
    bias = mha.in_proj_bias is not None
    attention = Attention(width, heads=heads, head_dim=width // heads, key_width=mha.kdim, value_width=mha.vdim,
                          bias=bias, dropout=mha.dropout, batch_first=mha.batch_first)
    weights = mha.in_proj_weight.chunk(3) if mha._qkv_same_embed_dim else \
        (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
    biases = mha.in_proj_bias.chunk(3) if bias else (None,) * 3
    for proj, weight, b in zip((attention.q_proj, attention.k_proj, attention.v_proj), weights, biases):
        proj.weight.copy_(weight)
        if b is not None:
            proj.bias.copy_(b)
    attention.out_proj.weight.copy_(mha.out_proj.weight)
    if mha.out_proj.bias is not None and bias:
        attention.out_proj.bias.copy_(mha.out_proj.bias)
    return attention.to(mha.out_proj.weight.device, mha.out_proj.weight.dtype).train(mha.training)


class SelfAttention(nn.Module):
    """Attention of a sequence over itself as attention written by hand around
    F.scaled_dot_product_attention computes it: one tensor (batch, tokens, width) in, one out, each
    token attending to every token (or, causal, to those up to its own), the query, key and value
    made by one packed projection (packed) or three, then heads x head_dim features back to width.

    Example:
        >>> attention = SelfAttention(64, heads=4, head_dim=16, causal=True, packed=True)
        >>> out = attention(torch.randn(2, 28, 64))
    """

    def __init__(self, width: int, *, heads: int, head_dim: int, bias: bool = True, causal: bool = False,
                 packed: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.embed_dim, self.num_heads, self.head_dim, self.causal, self.packed = width, heads, head_dim, causal, packed
        if packed:
            self.qkv = nn.Linear(width, 3 * inner, bias=bias)
        else:
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(width, inner, bias=bias) for _ in range(3))
        self.out_proj = nn.Linear(inner, width, bias=bias)

    def projections(self) -> list[nn.Linear]:
        """The layers that make the query, key and value: their rows, in that order, are the heads'."""
        return [self.qkv] if self.packed else [self.q_proj, self.k_proj, self.v_proj]

    def forward(self, x):
        n, length, _ = x.shape
        inner = self.num_heads * self.head_dim
        q, k, v = self.qkv(x).split(inner, dim=-1) if self.packed else (p(x) for p in self.projections())
        q, k, v = (t.view(n, length, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        heads = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.out_proj(heads.transpose(1, 2).reshape(n, length, inner))
