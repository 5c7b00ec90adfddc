"""Load a Llama-family GGUF file (e.g. SmolLM2-135M-Instruct.Q4_1.gguf) into our torch model.

Weights are dequantized with the ``gguf`` package. llama.cpp's converter permutes the rows of the Q
and K projections (interleaved RoPE pairs); we undo that so the weights match the Hugging Face layout
and our rotate-half RoPE. The tokenizer and chat template come from the GGUF metadata (converted by
transformers once, then cached).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from river.atomic import build_once
from river.errors import InvalidModelFile, ModelNotFound
from river.models.cache import cache_root, file_fingerprint
from river.models.config import LlamaConfig
from river.models.llama import LlamaForCausalLM

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def open_gguf(path: str | Path):
    """A ``gguf.GGUFReader`` over the file, or a clear error for a missing or unreadable file."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise ModelNotFound(f"GGUF file not found: {path}")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/struct/memmap errors on damaged files
        raise InvalidModelFile(f"cannot read GGUF file {path}: it is truncated or not a GGUF file ({exc})") from exc
    if not reader.tensors:
        raise InvalidModelFile(f"GGUF file {path} holds no tensors")
    return reader


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    return value


def config_from_gguf(reader) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise InvalidModelFile(f"GGUF architecture '{arch}' is not supported (only 'llama')")
    p = "llama."
    heads = int(_field(reader, p + "attention.head_count"))
    hidden = int(_field(reader, p + "embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, p + "vocab_size")
    if vocab is None:
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, p + "feed_forward_length")),
        num_layers=int(_field(reader, p + "block_count")),
        num_heads=heads,
        num_kv_heads=int(_field(reader, p + "attention.head_count_kv", heads)),
        head_dim=int(_field(reader, p + "rope.dimension_count", hidden // heads)),
        rope_theta=float(_field(reader, p + "rope.freq_base", 10000.0)),
        rms_norm_eps=float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in names,
        max_position_embeddings=int(_field(reader, p + "context_length", 2048)),
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (int(eos),),
    )


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (interleaved pairs -> rotate-half halves)."""
    half = weight.shape[0] // n_heads // 2
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def dequantized_tensors(reader):
    """Yield (gguf_name, float32 array in [out, in] layout) for every tensor."""
    import gguf

    for t in reader.tensors:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
        yield t.name, np.asarray(arr, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])


def state_dict_from_gguf(reader, cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for name, arr in dequantized_tensors(reader):
        if name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            key = "model.norm.weight"
        elif name == "output.weight":
            key = "lm_head.weight"
        elif name.startswith("blk."):
            _, idx, part, _w = name.split(".")
            if part not in _LAYER_NAMES:
                raise InvalidModelFile(f"unexpected GGUF tensor '{name}'")
            if part == "attn_q":
                arr = unpermute_rope_rows(arr, cfg.num_heads)
            elif part == "attn_k":
                arr = unpermute_rope_rows(arr, cfg.num_kv_heads)
            key = f"model.layers.{idx}.{_LAYER_NAMES[part]}.weight"
        elif name == "rope_freqs.weight":
            raise InvalidModelFile("GGUF with rope_freqs (scaled RoPE) is not supported")
        else:
            raise InvalidModelFile(f"unexpected GGUF tensor '{name}'")
        sd[key] = torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))
    return sd


def load_gguf_model(path: str | Path) -> tuple[LlamaForCausalLM, LlamaConfig]:
    reader = open_gguf(path)
    cfg = config_from_gguf(reader)
    model = LlamaForCausalLM(cfg)
    sd = state_dict_from_gguf(reader, cfg)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # weight shapes that disagree with the config
        detail = str(exc).strip().splitlines()[-1].strip()
        raise InvalidModelFile(f"{path}: weights do not match the GGUF metadata ({detail})") from None
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise InvalidModelFile(f"GGUF {path}: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), cfg


def load_gguf_tokenizer(path: str | Path):
    """The tokenizer and chat template stored in the GGUF metadata, as a transformers fast tokenizer.

    transformers converts GGUF vocabularies slowly (~15 s), so the result is cached by file fingerprint.
    """
    from transformers import AutoTokenizer

    path = Path(path)

    def convert(tmp: Path) -> None:
        logging.getLogger("transformers").setLevel(logging.ERROR)
        AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(str(tmp))

    cached = build_once(cache_root() / "tokenizers" / file_fingerprint(path), convert)
    return AutoTokenizer.from_pretrained(str(cached))
