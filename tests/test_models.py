"""The torch decoder against transformers' LlamaForCausalLM, and the weight loaders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from river.models.config import LlamaConfig
from river.models.gguf_loader import unpermute_rope_rows
from river.models.hf_dir import load_hf_dir, save_hf_dir
from tests_helpers import hf_logits

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Question: A farmer has 12 cows and buys 7 more. How many cows does he have?\nAnswer:",
    "Rivers flow to the sea because",
]


def ours_logits(model, ids):
    with torch.no_grad():
        s = ids.shape[1]
        return model(ids, torch.ones(1, s, dtype=torch.long), torch.arange(s)[None], *model.empty_past())[0]


def test_tiny_matches_transformers_via_hf_dir(tiny, tmp_path):
    from transformers import LlamaForCausalLM as HFLlama

    save_hf_dir(tiny.model, tmp_path / "hf", tiny.tokenizer)
    hf = HFLlama.from_pretrained(str(tmp_path / "hf")).eval()
    reloaded, cfg = load_hf_dir(tmp_path / "hf")
    assert cfg == tiny.config
    ids = torch.tensor([tiny.tokenizer("hello rivers, hello sea")["input_ids"]])
    ref = hf_logits(hf, ids)
    assert (ref - ours_logits(tiny.model, ids)).abs().max() <= 1e-4
    assert (ours_logits(reloaded, ids) - ours_logits(tiny.model, ids)).abs().max() == 0


def test_rope_base_survives_both_config_spellings():
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    assert LlamaConfig.from_hf_config({**base, "rope_theta": 123.0}).rope_theta == 123.0
    v5 = {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 456.0}}
    assert LlamaConfig.from_hf_config(v5).rope_theta == 456.0
    with pytest.raises(ValueError, match="not supported"):
        LlamaConfig.from_hf_config({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})


def test_hf_dir_config_written_for_transformers_4(tiny, tmp_path):
    save_hf_dir(tiny.model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["rope_theta"] == tiny.config.rope_theta and cfg["model_type"] == "llama"


def test_unpermute_inverts_llama_cpp_permutation():
    heads, dim = 3, 8
    w = np.arange(heads * dim * 5, dtype=np.float32).reshape(heads * dim, 5)
    permuted = w.reshape(heads, 2, dim // 2, 5).swapaxes(1, 2).reshape(w.shape)  # llama.cpp's convert
    np.testing.assert_array_equal(unpermute_rope_rows(permuted, heads), w)


@pytest.mark.slow
def test_smollm2_matches_transformers_on_same_gguf(smol):
    from transformers import AutoModelForCausalLM

    from river.models.registry import smollm2_gguf_path

    path = smollm2_gguf_path()
    hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name).eval()
    assert smol.config.rope_theta == hf.config.rope_theta == 100000.0
    for prompt in PROMPTS:
        ids = torch.tensor([smol.tokenizer(prompt)["input_ids"]])
        diff = (hf_logits(hf, ids) - ours_logits(smol.model, ids)).abs().max().item()
        assert diff <= 1e-4, (prompt, diff)
