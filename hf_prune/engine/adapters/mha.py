"""``nn.MultiheadAttention`` with pruned heads.

torch's module insists on ``num_heads * head_dim == embed_dim``: the projections' width is the
model width. Once whole heads are removed the projections are narrower than the model width, so
compaction (and loading a pruned checkpoint) switches the module's class to
:class:`PrunedMultiheadAttention`, which keeps every parameter name and attribute and computes the
same attention with the remaining heads. Masked (zeroed) heads contribute exactly nothing, so the
compacted module reproduces the masked one.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """Multi-head attention over ``num_heads`` heads of ``head_dim`` each, in and out of ``embed_dim``."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        q, k, v = self._project(query, key, value)  # (batch, heads, length, head_dim)
        mask = self._mask(key_padding_mask, attn_mask, q)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) * self.head_dim ** -0.5
            if mask is not None:
                scores = scores + mask
            elif is_causal:
                scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
            weights = F.dropout(scores.softmax(-1), dropout, self.training)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                                 is_causal=is_causal and mask is None)
            weights = None
        batch, length = out.shape[0], out.shape[2]
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(length, batch, -1))  # (length, batch, embed)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None:
            weights = weights.mean(1) if average_attn_weights else weights
            if unbatched:
                weights = weights.squeeze(0)
        return out, weights

    def _project(self, query, key, value):
        if self._qkv_same_embed_dim:
            w = self.in_proj_weight.chunk(3)
        else:
            w = (self.q_proj_weight, self.k_proj_weight, self.v_proj_weight)
        b = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
        return [F.linear(x, wi, bi).unflatten(-1, (self.num_heads, self.head_dim)).permute(1, 2, 0, 3)
                for x, wi, bi in zip((query, key, value), w, b)]

    def _mask(self, key_padding_mask, attn_mask, q):
        """One additive float mask of shape broadcastable to (batch, heads, L, S), or None."""
        mask = None
        if attn_mask is not None:
            mask = _additive(attn_mask, q.dtype)
            if mask.dim() == 3:  # (batch * heads, L, S) in torch's layout
                if mask.shape[0] != q.shape[0] * self.num_heads:
                    raise ValueError(f"attn_mask has {mask.shape[0]} per-head masks but this pruned attention "
                                     f"has {q.shape[0]} x {self.num_heads} (batch x heads)")
                mask = mask.view(q.shape[0], self.num_heads, *mask.shape[1:])
        if key_padding_mask is not None:
            pad = _additive(key_padding_mask, q.dtype)[:, None, None, :]
            mask = pad if mask is None else mask + pad
        return mask


def _additive(mask: torch.Tensor, dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:  # torch's convention: True means "may not attend"
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


def adapt_attention(module: nn.Module, set_attr=setattr) -> None:
    """Give a ``nn.MultiheadAttention`` that lost heads the class that can run it."""
    if not isinstance(module, nn.MultiheadAttention) or isinstance(module, PrunedMultiheadAttention):
        return
    if module.num_heads * module.head_dim == module.embed_dim:
        return
    if module.bias_k is not None or module.add_zero_attn:
        raise ValueError("pruning heads of nn.MultiheadAttention with add_bias_kv or add_zero_attn is not supported")
    set_attr(module, "__class__", PrunedMultiheadAttention)
