"""A Llama-family decoder in plain torch: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Module names follow Hugging Face's ``LlamaForCausalLM`` (``model.layers.N.self_attn.q_proj``) so that
state dicts load unchanged and a TorchScript ONNX export carries the same node-name scopes
(``/model/layers.N/...``) as an Optimum export. ``forward`` is exactly one decode step of the ONNX
contract (DESIGN section 3): S new tokens over P cached ones, presents = concat(past, new).
"""

from __future__ import annotations

import torch
from river.models.config import LlamaConfig
from torch import nn
from torch.nn import functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.pow(2).mean(-1, keepdim=True)
        return self.weight * (x * torch.rsqrt(variance + self.eps))


class RotaryEmbedding(nn.Module):
    """cos/sin tables computed from the position ids in the graph (no fixed maximum length)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids.to(torch.float32).unsqueeze(-1) * self.inv_freq  # [B,S,D/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().unsqueeze(1), emb.sin().unsqueeze(1)  # [B,1,S,D]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def new_kv(self, x, cos, sin):
        """K/V of the new tokens, RoPE applied: [B,Hkv,S,D] each."""
        b, s, _ = x.shape
        k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, cos, sin), v

    def attend(self, x, cos, sin, keys, values, mask):
        """Attention of the new tokens' queries over ``keys``/``values`` [B,Hkv,T,D] with additive mask."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        q = apply_rope(q, cos, sin)
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:  # grouped-query attention: each KV head serves `rep` query heads
            t = keys.shape[2]
            keys = keys.unsqueeze(2).expand(b, self.num_kv_heads, rep, t, self.head_dim).reshape(b, self.num_heads, t, self.head_dim)
            values = values.unsqueeze(2).expand(b, self.num_kv_heads, rep, t, self.head_dim).reshape(b, self.num_heads, t, self.head_dim)
        scores = torch.matmul(q, keys.transpose(2, 3)) * (self.head_dim**-0.5) + mask
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, values).transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.o_proj(out)

    def forward(self, x, cos, sin, mask, past_k, past_v):
        k, v = self.new_kv(x, cos, sin)
        present_k = torch.cat((past_k, k), dim=2)
        present_v = torch.cat((past_v, v), dim=2)
        return self.attend(x, cos, sin, present_k, present_v, mask), present_k, present_v


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, cos, sin, mask, past_k, past_v):
        attn, present_k, present_v = self.self_attn(self.input_layernorm(h), cos, sin, mask, past_k, past_v)
        h = h + attn
        h = h + self.mlp(self.post_attention_layernorm(h))
        return h, present_k, present_v


def additive_causal_mask(attention_mask: torch.Tensor, position_ids: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """[B,1,S,T] additive mask: key j is visible to query i iff attention_mask[b,j] == 1 and the key's
    position (its count among valid keys, cumsum(mask) - 1) is <= the query's position id.

    For an unpadded concatenated cache this is the usual "j <= P + i". Causality by *position*
    rather than by index also holds when the cache is a fixed-capacity buffer whose unused slots are
    masked (the shared-KV form), for any number of new tokens, and for left-padded batches whose
    position ids count only real tokens (as Hugging Face builds them). The dtype's lowest finite
    value is used rather than -inf so a fully padded row stays finite.
    """
    valid = attention_mask.bool()
    key_pos = torch.cumsum(attention_mask, dim=-1) - 1  # [B,T]
    causal = key_pos.unsqueeze(1) <= position_ids.unsqueeze(-1)  # [B,S,T]
    visible = causal & valid.unsqueeze(1)
    zero = torch.zeros((), dtype=dtype)
    low = torch.tensor(torch.finfo(dtype).min, dtype=dtype)
    return torch.where(visible, zero, low).unsqueeze(1)


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)

    def forward(self, input_ids, attention_mask, position_ids, past):
        """Final-normed hidden states [B,S,H] and the flat list of presents."""
        h = self.embed_tokens(input_ids)
        cos, sin = self.rotary_emb(position_ids)
        mask = additive_causal_mask(attention_mask, position_ids, h.dtype)
        presents = []
        for i, layer in enumerate(self.layers):
            h, k, v = layer(h, cos, sin, mask, past[2 * i], past[2 * i + 1])
            presents += [k, v]
        return self.norm(h), presents


class LlamaForCausalLM(nn.Module):
    """forward(input_ids, attention_mask, position_ids, *past) -> (logits, *presents).

    ``past`` is flat: key_0, value_0, key_1, value_1, ... each [B,Hkv,P,D] (the ONNX contract order).
    """

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids, attention_mask, position_ids, *past):
        if len(past) != 2 * self.config.num_layers:
            raise ValueError(f"expected {2 * self.config.num_layers} past tensors, got {len(past)}")
        h, presents = self.model(input_ids, attention_mask, position_ids, past)
        return (self.lm_head(h), *presents)

    def empty_past(self, batch: int = 1, dtype=torch.float32) -> list[torch.Tensor]:
        cfg = self.config
        return [torch.zeros(batch, cfg.num_kv_heads, 0, cfg.head_dim, dtype=dtype) for _ in range(2 * cfg.num_layers)]
