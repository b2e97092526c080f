"""Diffusion transformer (DiT) backbone used by MDLM, and in causal mode by the autoregressive baseline.

Tokens -> embedding -> N blocks (rotary self-attention and GELU-tanh MLP, each wrapped in adaLN-zero
modulation by a time embedding) -> adaLN final layer -> untied linear head -> logits.
The module sees tensors only: no tokenizer, no noise schedule, no distribution.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mdlm.config import ModelConfig


class LayerNorm(nn.Module):
    """LayerNorm without bias, computed in float32 whatever the input dtype."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            y = F.layer_norm(x.float(), (self.dim,)) * self.weight.float()
        return y.to(x.dtype)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for rotary position embeddings (rotate-half convention)."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, seq_len: int, device: torch.device, offset: int = 0) -> tuple[Tensor, Tensor]:
        """Tables for positions ``offset`` .. ``offset + seq_len - 1``."""
        positions = torch.arange(offset, offset + seq_len, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, self.inv_freq.to(device))
        angles = torch.cat((freqs, freqs), dim=-1)  # [L, head_dim]
        return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x`` [B, H, L, Dh] by position; computed in float32."""
    half = x.shape[-1] // 2
    xf = x.float()
    rotated = torch.cat((-xf[..., half:], xf[..., :half]), dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of scalar times ``t`` [B] -> [B, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat((torch.cos(args), torch.sin(args)), dim=-1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of t followed by a 2-layer SiLU MLP."""

    def __init__(self, cond_dim: int, frequency_dim: int = 256) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.frequency_dim).to(self.mlp[0].weight.dtype))


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1.0 + scale) + shift


class KVCache:
    """Keys and values of the positions a causal model has seen, per block ([B, H, capacity, Dh] each), for
    incremental decoding: ``length`` positions are filled. Exact only for causal attention, where a position's
    keys and values never depend on later tokens."""

    def __init__(self, n_layers: int, capacity: int) -> None:
        self.keys: list[Tensor | None] = [None] * n_layers  # allocated at the first write, in k's dtype
        self.values: list[Tensor | None] = [None] * n_layers
        self.capacity = capacity
        self.length = 0

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write the new positions' ``k``, ``v`` [B, H, n, Dh] after the ``length`` cached ones; return all
        keys and values so far. ``length`` advances once every block has written (:meth:`advance`)."""
        keys, values = self.keys[layer], self.values[layer]
        if keys is None or values is None:
            b, h, _, dh = k.shape
            keys = self.keys[layer] = k.new_zeros(b, h, self.capacity, dh)
            values = self.values[layer] = v.new_zeros(b, h, self.capacity, dh)
        end = self.length + k.shape[2]
        keys[:, :, self.length:end] = k
        values[:, :, self.length:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n


class PrefixKV:
    """Approximate prefix cache of a bidirectional window (Fast-dLLM's prefix cache): the keys and values, per
    block, of the window's first ``length`` positions, taken from one full forward pass and reused by later
    passes that compute only the positions after them. Not exact: in a bidirectional model those keys and
    values depend on the later positions too, which change between passes. ``rows`` (set by the caller) picks
    the cached rows a pass over part of the batch needs."""

    def __init__(self, length: int) -> None:
        if length < 1:
            raise ValueError(f"prefix length must be >= 1, got {length}")
        self.length = length
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.rows: Tensor | None = None

    @property
    def filled(self) -> bool:
        return bool(self.keys)

    def use(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Filling pass: keep the prefix's part of ``k``, ``v`` [B, H, L, Dh] and return them as they are. Later
        passes (``k``, ``v`` of the positions after the prefix): the cached prefix's keys and values before them."""
        if len(self.keys) <= layer:
            self.keys.append(k[:, :, :self.length].clone())
            self.values.append(v[:, :, :self.length].clone())
            return k, v
        keys, values = self.keys[layer], self.values[layer]
        if self.rows is not None:
            keys, values = keys[self.rows], values[self.rows]
        return torch.cat((keys, k), dim=2), torch.cat((values, v), dim=2)


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-zero modulation (6 x dim, zero-initialised)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        dim = config.hidden_size
        self.n_heads = config.n_heads
        self.dropout = config.dropout
        self.norm1 = LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.attn_out = nn.Linear(dim, dim, bias=False)
        self.norm2 = LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, config.mlp_ratio * dim),
            nn.GELU(approximate="tanh"),
            nn.Linear(config.mlp_ratio * dim, dim),
        )
        self.adaln = nn.Linear(config.cond_dim, 6 * dim)
        nn.init.zeros_(self.adaln.weight)
        nn.init.zeros_(self.adaln.bias)

    def forward(self, x: Tensor, c: Tensor, rotary: tuple[Tensor, Tensor], attn_mask: Tensor | None,
                causal: bool, cache: KVCache | PrefixKV | None = None, layer: int = 0) -> Tensor:
        """``cache``: ``x`` holds the positions after the cached ones, whose keys and values block ``layer``
        reads from (and appends to) the cache; ``attn_mask`` then covers [n, cached + n]. A filling
        :class:`PrefixKV` pass sees the whole window."""
        b, n, d = x.shape
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaln(c)[:, None, :].chunk(6, dim=-1)

        h = modulate(self.norm1(x), shift_a, scale_a)
        q, k, v = self.qkv(h).view(b, n, 3, self.n_heads, d // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, *rotary), apply_rotary(k, *rotary)
        if isinstance(cache, PrefixKV):
            k, v = cache.use(layer, k, v)
        elif cache is not None:
            k, v = cache.extend(layer, k, v)
        is_causal = causal and attn_mask is None and k.shape[2] == n  # with a cache: a mask, or one query
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        attn = attn.transpose(1, 2).reshape(b, n, d)
        x = x + gate_a * F.dropout(self.attn_out(attn), self.dropout, self.training)

        h = modulate(self.norm2(x), shift_m, scale_m)
        return x + gate_m * F.dropout(self.mlp(h), self.dropout, self.training)


def padded_vocab_size(config: ModelConfig) -> int:
    """Output columns: ``vocab_size`` rounded up to a multiple of ``vocab_pad_multiple``."""
    return -(-config.vocab_size // config.vocab_pad_multiple) * config.vocab_pad_multiple


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and the untied output projection, both zero-initialised.

    The projection may have padding columns (``vocab_pad_multiple``); their logits are cut off here."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.vocab_size = config.vocab_size
        self.norm = LayerNorm(config.hidden_size)
        self.adaln = nn.Linear(config.cond_dim, 2 * config.hidden_size)
        self.linear = nn.Linear(config.hidden_size, padded_vocab_size(config))
        for layer in (self.adaln, self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaln(c)[:, None, :].chunk(2, dim=-1)
        logits = self.linear(modulate(self.norm(x), shift, scale))
        return logits if logits.shape[-1] == self.vocab_size else logits[..., :self.vocab_size]


class DiT(nn.Module):
    """The backbone: ``forward(input_ids [B, L], t [B] | None) -> logits [B, L, V]``.

    With ``config.time_conditioning`` off (the paper's default for MDLM) the time input is zeroed, so the
    adaLN modulation is a learned constant. ``causal=True`` gives the autoregressive baseline.
    """

    def __init__(self, config: ModelConfig, causal: bool = False) -> None:
        super().__init__()
        self.config = config
        self.causal = causal
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        nn.init.kaiming_uniform_(self.embed.weight, a=math.sqrt(5))
        self.time_embed = TimestepEmbedder(config.cond_dim)
        self.rotary = RotaryEmbedding(config.hidden_size // config.n_heads, config.rope_base)
        self.blocks = nn.ModuleList(DiTBlock(config) for _ in range(config.n_layers))
        self.final = FinalLayer(config)

    def forward(self, input_ids: Tensor, t: Tensor | None = None, attention_mask: Tensor | None = None,
                cache: KVCache | PrefixKV | None = None) -> Tensor:
        """Logits [B, n, V] of ``input_ids`` [B, n]; with a ``cache`` (causal models, see :meth:`new_cache`) the
        ids are the positions after the cached ones, and the cache takes their keys and values. With a
        :class:`PrefixKV` (bidirectional models): an empty one is filled by this pass over the whole window; a
        filled one means the ids are the positions after its prefix (approximate, see the class)."""
        if isinstance(cache, PrefixKV):
            return self._forward_prefix(input_ids, t, attention_mask, cache)
        b, n = input_ids.shape
        start = 0 if cache is None else cache.length
        if start + n > self.config.max_seq_len:
            raise ValueError(f"sequence length {start + n} exceeds model max_seq_len {self.config.max_seq_len}")
        if cache is not None and (not self.causal or attention_mask is not None or start + n > cache.capacity):
            raise ValueError("a KV cache needs a causal model, no attention_mask and room for "
                             f"{start + n} positions (capacity {cache.capacity})")
        x = self.embed(input_ids)
        if t is None or not self.config.time_conditioning:
            t = torch.zeros(b, device=input_ids.device)
        c = F.silu(self.time_embed(t))
        rotary = self.rotary(n, input_ids.device, offset=start)
        if cache is None:
            attn_mask = self._attention_mask(attention_mask, n, input_ids.device)
        else:  # query i (position start + i) sees keys 0 .. start + i; one query sees all: no mask
            attn_mask = None if n == 1 or start == 0 else torch.ones(
                n, start + n, dtype=torch.bool, device=input_ids.device).tril(diagonal=start)
        for layer, block in enumerate(self.blocks):
            x = block(x, c, rotary, attn_mask, self.causal, cache, layer)
        if cache is not None:
            cache.advance(n)
        return self.final(x, c)

    def _forward_prefix(self, input_ids: Tensor, t: Tensor | None, attention_mask: Tensor | None,
                        prefix: PrefixKV) -> Tensor:
        if self.causal or attention_mask is not None:
            raise ValueError("a prefix cache is for a bidirectional model, without attention_mask")
        b, n = input_ids.shape
        start = prefix.length if prefix.filled else 0
        if start + n > self.config.max_seq_len or (not prefix.filled and n <= prefix.length):
            raise ValueError(f"a window of {start + n} positions does not fit the prefix cache of {prefix.length} "
                             f"and max_seq_len {self.config.max_seq_len}")
        x = self.embed(input_ids)
        if t is None or not self.config.time_conditioning:
            t = torch.zeros(b, device=input_ids.device)
        c = F.silu(self.time_embed(t))
        rotary = self.rotary(n, input_ids.device, offset=start)
        for layer, block in enumerate(self.blocks):
            x = block(x, c, rotary, None, False, prefix, layer)
        return self.final(x, c)

    def new_cache(self, capacity: int | None = None) -> KVCache:
        """An empty KV cache for sequences of up to ``capacity`` (default max_seq_len) positions (causal models
        only); it takes the batch, dtype and device of the first forward pass that fills it."""
        if not self.causal:
            raise ValueError("a KV cache is exact only for a causal model: bidirectional keys change with "
                             "every new token")
        capacity = capacity or self.config.max_seq_len
        if not 0 < capacity <= self.config.max_seq_len:
            raise ValueError(f"cache capacity must be in [1, max_seq_len={self.config.max_seq_len}], got {capacity}")
        return KVCache(len(self.blocks), capacity)

    def _attention_mask(self, attention_mask: Tensor | None, n: int, device: torch.device) -> Tensor | None:
        """Boolean [B, 1, L, L] mask hiding padded keys (and future keys when causal); None if not needed."""
        if attention_mask is None or bool(attention_mask.all()):
            return None
        keep = attention_mask.bool()[:, None, None, :]
        if self.causal:
            keep = keep & torch.ones(n, n, dtype=torch.bool, device=device).tril()
        # A query whose every key is hidden would give NaN; let padded queries see themselves.
        return keep | torch.eye(n, dtype=torch.bool, device=device)

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.embed.weight.numel()
        return total
