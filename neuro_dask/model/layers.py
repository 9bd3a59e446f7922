"""The trunk's building blocks: RMSNorm, rotary embeddings, grouped-query attention with a KV cache.

Shape legend: B batch, T new tokens, S cached positions (keys), H query heads, G key/value heads,
Dh head dim, D hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neuro_dask.model.cache import KVCache
from neuro_dask.model.config import QK_NORM_FULL, QK_NORM_PER_HEAD, MoEConfig


class RMSNorm(nn.Module):
    """Computed in float32 and cast back, as transformers does, so golden checks match to 1e-6."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, Dh]."""
        freqs = positions[..., None].float() * self.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, Dh]; cos, sin [B, T, Dh]."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: MoEConfig):
        super().__init__()
        d, h, g, dh = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        qkv_bias = cfg.attention_bias or cfg.qkv_bias
        self.q_proj = nn.Linear(d, h * dh, bias=qkv_bias)
        self.k_proj = nn.Linear(d, g * dh, bias=qkv_bias)
        self.v_proj = nn.Linear(d, g * dh, bias=qkv_bias)
        self.o_proj = nn.Linear(h * dh, d, bias=cfg.attention_bias)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if cfg.qk_norm == QK_NORM_PER_HEAD:
            self.q_norm, self.k_norm = RMSNorm(dh, cfg.rms_norm_eps), RMSNorm(dh, cfg.rms_norm_eps)
        elif cfg.qk_norm == QK_NORM_FULL:
            self.q_norm, self.k_norm = RMSNorm(h * dh, cfg.rms_norm_eps), RMSNorm(g * dh, cfg.rms_norm_eps)
        self.per_head_norm = cfg.qk_norm == QK_NORM_PER_HEAD
        self.clip_qkv = cfg.clip_qkv
        self.heads, self.kv_heads, self.head_dim = h, g, dh

    def _project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, D] -> q [B, H, T, Dh], k, v [B, G, T, Dh]."""
        b, t, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.q_norm is not None and not self.per_head_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (z.clamp(-self.clip_qkv, self.clip_qkv) for z in (q, k, v))
        q = q.view(b, t, self.heads, self.head_dim)
        k = k.view(b, t, self.kv_heads, self.head_dim)
        v = v.view(b, t, self.kv_heads, self.head_dim)
        if self.q_norm is not None and self.per_head_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor,
        cache: KVCache | None,
        layer: int,
    ) -> torch.Tensor:
        """x [B, T, D]; mask [B, 1, T, S] bool (True = may attend) -> [B, T, D]."""
        q, k, v = self._project(x)
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.heads != self.kv_heads)
        b, _, t, _ = out.shape
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


def attention_mask(
    key_valid: torch.Tensor, query_start: int, num_queries: int, sliding_window: int | None
) -> torch.Tensor:
    """Boolean [B, 1, T, S] mask: causal over cache slots, padded keys hidden.

    key_valid [B, S] marks real tokens among the cached slots. Queries occupy slots
    query_start .. query_start+T-1. A query always sees its own slot, so a padded query row
    is never fully masked (that would give NaN, and pad rows' outputs are never used).
    """
    s = key_valid.shape[1]
    q_slot = torch.arange(query_start, query_start + num_queries, device=key_valid.device)[:, None]
    k_slot = torch.arange(s, device=key_valid.device)[None, :]
    allowed = k_slot <= q_slot
    if sliding_window is not None:
        allowed = allowed & (q_slot - k_slot < sliding_window)
    mask = allowed[None] & key_valid[:, None, :]
    mask = mask | (k_slot == q_slot)[None]
    return mask[:, None]


class SwiGLU(nn.Module):
    """Dense SwiGLU MLP: Qwen's shared expert and its dense (mlp_only) layers."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
