"""River on the decoder families users export: tiny random-weight models of each family, exported by
Hugging Face Optimum (``text-generation-with-past``, offline), go through ``river-export``; the River
invariants hold; and greedy tokens from our runtime (full depth, and lossless verify mode) equal
Optimum's own ``ORTModelForCausalLM.generate`` on the same export (EOS never stops either side).

Block shapes covered: sequential pre-norm (Llama, Qwen2, Mistral, Phi-3, StableLM, Gemma), q/k norms
(Qwen3, OLMo 2), post-norm (OLMo 2) and sandwich norms (Gemma 2), parallel attention + MLP (Phi-2,
GPT-NeoX), scaled embeddings and residuals (Gemma, Granite); Llama 3.2 rope scaling; position ids
derived from the mask (Gemma, Gemma 2); a sliding window crossed by the generation (Gemma 2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from river.compiler.compile import compile_river
from river.compiler.river.manifest import DISABLED, EXIT_LAYER, FORCED_EXIT, THRESHOLDS
from river.errors import RiverError
from river.export import contract as C
from river.export.contract import StepContract
from river.runtime.generate import GenerationConfig
from river.runtime.loading import open_generator, open_verifier
from river.runtime.ort_backend import OrtBackend
from tests_helpers import poison_decode

BASE = dict(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
# Optimum 2.x's ORTModelForCausalLM sizes the empty past of Phi-3, OLMo 2 and Gemma 2 by the attention
# heads, so those references need MHA (GQA is covered by the other families).
MHA = {"num_key_value_heads": 4}
FAMILIES = {
    "llama": ("LlamaConfig", {}),
    "llama-mha": ("LlamaConfig", MHA),
    "llama3.2": ("LlamaConfig", {"rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "phi3": ("Phi3Config", {"pad_token_id": 0, **MHA}),
    "olmo2": ("Olmo2Config", MHA),
    "stablelm": ("StableLmConfig", {}),
    "gemma": ("GemmaConfig", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 8, "query_pre_attn_scalar": 16, **MHA}),
    "phi2": ("PhiConfig", {"num_key_value_heads": None}),
    "gpt-neox": ("GPTNeoXConfig", {"num_key_value_heads": None}),
    "granite": ("GraniteConfig", {"residual_multiplier": 0.5, "embedding_multiplier": 2.0,
                                  "attention_multiplier": 0.25, "logits_scaling": 2.0}),
}
PARALLEL = ("phi2", "gpt-neox")
PROMPT = [5, 17, 33, 2, 41, 8, 99, 12]
NEW_TOKENS = 16  # 24 positions: Gemma 2's window of 8 is crossed


@pytest.fixture(scope="module")
def exports(tmp_path_factory, tiny):
    """family -> its Optimum export (made on first use; a module-wide cache)."""
    made: dict[str, Path] = {}
    work = tmp_path_factory.mktemp("families")

    def get(name: str) -> Path:
        if name not in made:
            made[name] = _export(name, work / name, tiny.tokenizer)
        return made[name]

    return get


def _export(name: str, work: Path, tokenizer) -> Path:
    import torch
    import transformers
    from optimum.exporters.onnx import main_export

    cls, overrides = FAMILIES[name]
    kwargs = {k: v for k, v in {**BASE, **overrides}.items() if v is not None or k == "sliding_window"}
    config = getattr(transformers, cls)(**kwargs)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(work / "hf")
    tokenizer.save_pretrained(work / "hf")
    main_export(str(work / "hf"), output=str(work / "optimum"), task="text-generation-with-past", device="cpu")
    return work / "optimum" / "model.onnx"


def _river(onnx_path: Path, river: str = "int8") -> Path:
    out = onnx_path.parent.parent / f"river-{river}"
    if not (out / "model.onnx").is_file():
        compile_river(onnx_path, out, gates="1,2", river=river, log=None)
    return out / "model.onnx"


def _optimum_greedy(onnx_path: Path) -> list[int]:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    model = ORTModelForCausalLM.from_pretrained(str(onnx_path.parent), use_cache=True, use_io_binding=False)
    model.generation_config.eos_token_id = None  # EOS is an ordinary token here, as on our side
    model.generation_config.pad_token_id = 0
    out = model.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                         max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, len(PROMPT):].tolist()


@pytest.mark.parametrize("name", list(FAMILIES))
def test_river_graph_invariants(name, exports):
    source = exports(name)
    river = _river(source)
    contract = StepContract.from_model(onnx.load(str(source), load_external_data=False))
    assert contract.position_ids == (name not in ("gemma", "gemma2"))
    # 1. every gate off: the River graph computes the original graph's logits and presents
    plain = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    riv = ort.InferenceSession(str(river), providers=["CPUExecutionProvider"])
    names = [o.name for o in plain.get_outputs()]
    feeds = C.step_feeds(contract, np.asarray([PROMPT[:6]]))
    want = dict(zip(names, plain.run(None, feeds)))
    got = dict(zip([o.name for o in riv.get_outputs()], riv.run(None, {**feeds, THRESHOLDS: np.full(2, DISABLED, np.float32)})))
    assert int(got[EXIT_LAYER][0]) == contract.num_layers
    for key in names:
        np.testing.assert_allclose(got[key], want[key], atol=1e-5, err_msg=key)
    # 2. forced exits at each gate leave no KV hole, through the runtime's in-place steps
    backend, seen = OrtBackend(river, threads=1), []
    poison_decode(backend, [[FORCED_EXIT, DISABLED], [DISABLED, FORCED_EXIT], [DISABLED, DISABLED]], seen)
    cache = backend.new_cache(len(PROMPT) + 7)
    backend.prefill(np.asarray([PROMPT]), cache)
    cache.length = len(PROMPT)
    for token in (3, 9, 27, 11, 4, 60):
        backend.decode(np.asarray([[token]]), cache)
        cache.length += 1
    assert seen == [2, 3, 4, 2, 3, 4]


@pytest.mark.parametrize("name", ["llama", "qwen3", "phi2"])
def test_ort_lowering_keeps_optimum_exports_portable_and_says_why(name, exports):
    """Optimum's attention (its softmax output goes through more than a MatMul) is not a pattern the
    fused ONNX Runtime lowering knows: it says so, and the graph runs in its portable form."""
    backend = OrtBackend(exports(name), threads=1)
    assert backend.lowering == "portable"
    assert "not matched" in backend.lowering_reason


@pytest.mark.parametrize("name", list(FAMILIES))
def test_greedy_equals_optimum_full_depth_and_verify(name, exports):
    source = exports(name)
    want = _optimum_greedy(source)
    cfg = GenerationConfig(max_new_tokens=NEW_TOKENS, eos_token_ids=())
    full = open_generator(str(source)).generate(PROMPT, cfg, chat=False).token_ids
    assert full == want
    verifier = open_verifier(str(_river(source)), k=3)  # the shipped draft graph over the Optimum export
    assert verifier.generate(PROMPT, cfg, chat=False).token_ids == want
    assert verifier.stats.rounds > 0


def test_sliding_window_steps_are_exact(exports):
    """Gemma 2 (window 8): its steps run in the contract form (the shared-KV form would misplace the
    window) and equal the contract graph, within and beyond the window."""
    source = exports("gemma2")
    backend = OrtBackend(source, threads=1)
    assert backend.kv_window == 8
    contract = backend.contract
    plain = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    tokens = np.asarray([PROMPT])
    want = plain.run(None, C.step_feeds(contract, tokens))[0][0]
    for capacity in (8, 20):
        cache = backend.new_cache(capacity)
        backend.prefill(tokens[:, :4], cache)
        cache.length = 4
        assert backend._needs_contract_step(tokens[:, 4:5], cache)
        for i in range(4, 8):
            got = backend.decode(tokens[:, i:i + 1], cache)[0, -1]
            cache.length += 1
            np.testing.assert_allclose(got, want[i], atol=1e-4)


@pytest.mark.parametrize("name", PARALLEL)
def test_parallel_blocks_refuse_attention_only_twins(name, exports):
    with pytest.raises(RiverError, match="parallel block"):
        compile_river(exports(name), exports(name).parent.parent / "attn", gates="1,2", river="attn", log=None)
    assert not (exports(name).parent.parent / "attn").exists()
