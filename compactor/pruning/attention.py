"""Attention blocks: finding them, and keeping them consistent when heads are removed.

A head is ``head_dim`` consecutive output channels of the query, key and value projections
(and the matching input channels of the output projection). The dependency graph couples
those four layers; this module says where the heads are, and after pruning fixes the
attributes that the block's ``forward`` reads (``num_attention_heads``, ``all_head_size``...).

``torch.nn.MultiheadAttention`` keeps its projections in one fused ``in_proj_weight`` whose
inner width must equal the model width, so no head can be removed from it as it is. It is
replaced, before pruning, by :class:`SplitHeadAttention`: the same computation with separate
q/k/v projections whose width may shrink.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    """Where a kind of attention block keeps its projections and head counts."""

    q: str
    k: str
    v: str
    heads: str  # attribute: number of heads
    head_dim: str | None  # attribute: channels per head (None: derived)
    widths: tuple[str, ...] = ()  # attributes equal to heads * head_dim


LAYOUTS = (
    # Hugging Face BERT and its copies (RoBERTa, ELECTRA, MiniLM...): BertSelfAttention
    Layout("query", "key", "value", "num_attention_heads", "attention_head_size",
           ("all_head_size",)),
    # SplitHeadAttention below, and q_proj/k_proj/v_proj style blocks
    Layout("q_proj", "k_proj", "v_proj", "num_heads", "head_dim"),
)


@dataclass
class AttentionBlock:
    """One attention block of a model."""

    name: str
    module: nn.Module
    layout: Layout

    @property
    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        lo = self.layout
        return getattr(self.module, lo.q), getattr(self.module, lo.k), getattr(self.module, lo.v)

    @property
    def num_heads(self) -> int:
        return int(getattr(self.module, self.layout.heads))

    @property
    def head_dim(self) -> int:
        if self.layout.head_dim and isinstance(getattr(self.module, self.layout.head_dim, None),
                                               int):
            return int(getattr(self.module, self.layout.head_dim))
        return self.projections[0].out_features // self.num_heads

    @property
    def prunable(self) -> str | None:
        """None when whole heads can be removed, else why not."""
        q, k, v = self.projections
        width = self.num_heads * self.head_dim
        if not (q.out_features == k.out_features == v.out_features == width):
            return (f"query/key/value widths {q.out_features}/{k.out_features}/"
                    f"{v.out_features} are not {self.num_heads} heads of {self.head_dim} "
                    "(grouped-query attention is not supported)")
        return None

    def set_heads(self, heads: int) -> None:
        """Fix the block's attributes after ``heads`` heads remain."""
        dim = self.head_dim
        setattr(self.module, self.layout.heads, heads)
        for attr in self.layout.widths:
            if hasattr(self.module, attr):
                setattr(self.module, attr, heads * dim)


def find_attention(model: nn.Module) -> list[AttentionBlock]:
    """Attention blocks whose heads compactor knows how to remove."""
    blocks = []
    for name, m in model.named_modules():
        for lo in LAYOUTS:
            projs = [getattr(m, a, None) for a in (lo.q, lo.k, lo.v)]
            heads = getattr(m, lo.heads, None)
            if all(isinstance(p, nn.Linear) for p in projs) and isinstance(heads, int) \
                    and heads > 0:
                blocks.append(AttentionBlock(name, m, lo))
                break
    return blocks


# --------------------------------------------------------------------------- nn.MultiheadAttention


class SplitHeadAttention(nn.Module):
    """``nn.MultiheadAttention`` with separate q/k/v projections, so heads can be removed.

    Same arguments, same outputs (attention output, and the attention weights when
    ``need_weights``). The projections' width (``num_heads * head_dim``) may be smaller than
    ``embed_dim``, the width of the model around it.
    """

    def __init__(self, embed_dim: int, num_heads: int, kdim: int | None = None,
                 vdim: int | None = None, bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not a multiple of num_heads {num_heads}")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.head_dim = embed_dim // num_heads
        self.batch_first = batch_first
        self.dropout = dropout
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        # nn.TransformerEncoderLayer reads these to decide on its fused fast path, which
        # needs the fused weights: None sends it down the ordinary path, through forward().
        self.in_proj_weight = None
        self.in_proj_bias = None
        self._qkv_same_embed_dim = False

    @classmethod
    def from_module(cls, mha: nn.MultiheadAttention) -> SplitHeadAttention:
        e = mha.embed_dim
        bias = mha.in_proj_bias is not None
        new = cls(e, mha.num_heads, mha.kdim, mha.vdim, bias=bias, batch_first=mha.batch_first,
                  dropout=mha.dropout)
        with torch.no_grad():
            if mha._qkv_same_embed_dim:
                wq, wk, wv = mha.in_proj_weight.chunk(3)
            else:
                wq, wk, wv = mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight
            for proj, w in ((new.q_proj, wq), (new.k_proj, wk), (new.v_proj, wv)):
                proj.weight.copy_(w)
            if bias:
                for proj, b in zip((new.q_proj, new.k_proj, new.v_proj),
                                   mha.in_proj_bias.chunk(3), strict=True):
                    proj.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if new.out_proj.bias is not None and mha.out_proj.bias is not None:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        return new.train(mha.training)

    def forward(self, query, key, value, key_padding_mask=None, need_weights: bool = True,
                attn_mask=None, average_attn_weights: bool = True, is_causal: bool = False):
        batched = query.dim() == 3
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # from here on: (seq, batch, features), as nn.MultiheadAttention works internally
        tgt, bsz = query.shape[0], query.shape[1]
        src = key.shape[0]
        d = self.head_dim
        q = self.q_proj(query).reshape(tgt, bsz, -1, d).permute(1, 2, 0, 3)
        k = self.k_proj(key).reshape(src, bsz, -1, d).permute(1, 2, 0, 3)
        v = self.v_proj(value).reshape(src, bsz, -1, d).permute(1, 2, 0, 3)
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(d))
        scores = scores + self._bias(attn_mask, key_padding_mask, is_causal, tgt, src, bsz,
                                     scores.dtype, scores.device)
        weights = torch.softmax(scores, dim=-1)
        if self.training and self.dropout > 0:
            weights = nn.functional.dropout(weights, p=self.dropout)
        out = torch.matmul(weights, v)  # (batch, heads, tgt, d)
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(tgt, bsz, -1))
        if not batched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if not need_weights:
            return out, None
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            weights = weights.squeeze(0)
        return out, weights

    def _bias(self, attn_mask, key_padding_mask, is_causal, tgt, src, bsz, dtype, device):
        bias = torch.zeros((), dtype=dtype, device=device)
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tgt, src, dtype=torch.bool, device=device).triu(1)
        if attn_mask is not None:
            if attn_mask.dim() == 3:
                if attn_mask.shape[0] != bsz * self.num_heads:
                    raise RuntimeError(
                        "a per-head attn_mask no longer fits after heads were pruned"
                    )
                attn_mask = attn_mask.reshape(bsz, self.num_heads, tgt, src)
            bias = bias + _additive(attn_mask, dtype)
        if key_padding_mask is not None:
            bias = bias + _additive(key_padding_mask, dtype)[:, None, None, :]
        return bias


def _additive(mask, dtype):
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(
            mask, float("-inf"))
    return mask.to(dtype)


def split_multihead_attention(model: nn.Module) -> list[str]:
    """Replace each ``nn.MultiheadAttention`` in ``model`` with a :class:`SplitHeadAttention`
    that computes the same thing. Returns the names of the replaced modules; a module
    using ``add_bias_kv`` or ``add_zero_attn`` is left as it is (its heads are not pruned)."""
    replaced = []
    for name, m in list(model.named_modules()):
        if type(m) is not nn.MultiheadAttention:
            continue
        if m.bias_k is not None or m.add_zero_attn:
            log.info("%s uses add_bias_kv/add_zero_attn; its heads are not pruned", name)
            continue
        parent, _, attr = name.rpartition(".")
        owner: Any = model.get_submodule(parent) if parent else model
        setattr(owner, attr, SplitHeadAttention.from_module(m))
        replaced.append(name)
    return replaced
