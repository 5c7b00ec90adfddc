"""A tiny random-weight model of the Llama family, with a byte-level tokenizer, for fast tests.

Weights are scaled so logits are peaked (not the near-uniform output of std=0.02 init): greedy
decoding then has clear winners and cross-runtime comparisons are not dominated by near-ties.
"""

from __future__ import annotations

import torch
from river.models.config import LlamaConfig
from river.models.llama import LlamaForCausalLM

SPECIALS = ["<s>", "</s>", "<pad>"]
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def tiny_config(num_layers: int = 4) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256 + len(SPECIALS),
        hidden_size=64,
        intermediate_size=128,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        max_position_embeddings=512,
        bos_token_id=256,
        eos_token_ids=(257,),
    )


def tiny_model(seed: int = 0, num_layers: int = 4) -> LlamaForCausalLM:
    cfg = tiny_config(num_layers)
    model = LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif p.dim() == 2:
                fan_in = p.shape[1]
                p.copy_(torch.randn(p.shape, generator=gen) * (1.5 / fan_in**0.5))
    return model.eval()


def tiny_tokenizer():
    """A byte-level BPE tokenizer with no merges: one token per byte, plus <s>, </s>, <pad>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps each byte to a printable char; order them by byte value for a stable vocab.
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    mapping = bytes_to_unicode()
    vocab = {mapping[b]: b for b in range(256)}
    assert set(vocab) == set(byte_chars)
    for i, tok in enumerate(SPECIALS):
        vocab[tok] = 256 + i
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok
