"""The decode-step graph contract (DESIGN section 3): Hugging Face Optimum's names and axes.

One graph computes one forward step of S new tokens over P cached ones:
inputs  input_ids [B,S] int64, attention_mask [B,P+S] int64, position_ids [B,S] int64 (optional:
        some exports derive positions from the mask and the past length),
        past_key_values.{l}.key / .value [B,Hkv,P,D]
outputs logits [B,S,V], present.{l}.key / .value [B,Hkv,P+S,D]
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import onnx
from river.errors import NotADecoderGraph

INPUT_IDS, ATTENTION_MASK, POSITION_IDS, LOGITS = "input_ids", "attention_mask", "position_ids", "logits"
# metadata property saying how the graph masks causally: "position" = by position ids, so multi-token
# steps over the shared KV buffers are exact (our exports); absent = by index
CAUSAL_PROP = "river.causal_mask"
META_FILE = "river_model.json"  # beside an exported graph: model name, source and config (EOS ids, context)
_PAST_RE = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


def past_layers(model: onnx.ModelProto) -> list[int]:
    """The layers whose ``past_key_values.{l}`` a graph reads (every layer for a step graph, a range
    for a River segment)."""
    return sorted({int(m.group(1)) for i in model.graph.input if (m := _PAST_RE.match(i.name))})


def past_name(layer: int, kind: str) -> str:
    return f"past_key_values.{layer}.{kind}"


def present_name(layer: int, kind: str) -> str:
    return f"present.{layer}.{kind}"


def present_names(num_layers: int) -> list[str]:
    """Every layer's present K and V, in the contract's order."""
    return [present_name(layer, kind) for layer in range(num_layers) for kind in ("key", "value")]


def past_of(outputs: dict, num_layers: int, length: int | None = None) -> dict:
    """The ``past_key_values`` feeds of the next contract step: each layer's ``present`` from a step's
    ``outputs`` (its first ``length`` positions when given)."""
    return {past_name(layer, kind): outputs[present_name(layer, kind)] if length is None
            else outputs[present_name(layer, kind)][:, :, :length]
            for layer in range(num_layers) for kind in ("key", "value")}


def input_names(num_layers: int) -> list[str]:
    names = [INPUT_IDS, ATTENTION_MASK, POSITION_IDS]
    for layer in range(num_layers):
        names += [past_name(layer, "key"), past_name(layer, "value")]
    return names


def output_names(num_layers: int) -> list[str]:
    names = [LOGITS]
    for layer in range(num_layers):
        names += [present_name(layer, "key"), present_name(layer, "value")]
    return names


def dynamic_axes(num_layers: int) -> dict[str, dict[int, str]]:
    axes = {
        INPUT_IDS: {0: "batch_size", 1: "sequence_length"},
        ATTENTION_MASK: {0: "batch_size", 1: "total_sequence_length"},
        POSITION_IDS: {0: "batch_size", 1: "sequence_length"},
        LOGITS: {0: "batch_size", 1: "sequence_length"},
    }
    for layer in range(num_layers):
        for kind in ("key", "value"):
            axes[past_name(layer, kind)] = {0: "batch_size", 2: "past_sequence_length"}
            axes[present_name(layer, kind)] = {0: "batch_size", 2: "total_sequence_length"}
    return axes


@dataclass(frozen=True)
class StepContract:
    """What a runtime needs to know about a step graph, read from the graph's own signature."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int | None
    kv_dtype: int  # onnx.TensorProto element type of the KV tensors
    position_ids: bool = True  # the graph takes position_ids (Gemma's Optimum exports derive them from the mask)

    @classmethod
    def of_config(cls, config) -> "StepContract":
        """The contract our export of a torch decoder with this config (``models/config.py``) has, fp32 KV."""
        return cls(config.num_layers, config.num_kv_heads, config.head_dim, config.vocab_size, onnx.TensorProto.FLOAT)

    @classmethod
    def from_model(cls, model: onnx.ModelProto, source: str = "model") -> "StepContract":
        graph = model.graph
        inputs = {i.name: i for i in graph.input}
        outputs = {o.name: o for o in graph.output}
        missing = [n for n in (INPUT_IDS, ATTENTION_MASK) if n not in inputs]
        if LOGITS not in outputs:
            missing.append(LOGITS + " (output)")
        layers = sorted({int(m.group(1)) for n in inputs if (m := _PAST_RE.match(n))})
        if not layers:
            missing.append("past_key_values.{l}.key/value")
        if missing:
            raise NotADecoderGraph(
                f"{source} is not a decoder step graph: missing {', '.join(missing)} "
                "(expected Optimum's text-generation-with-past signature)"
            )
        if layers != list(range(len(layers))):
            raise NotADecoderGraph(f"{source}: past_key_values layers are not numbered 0..L-1: {layers}")
        for layer in layers:
            for kind in ("key", "value"):
                if past_name(layer, kind) not in inputs:
                    raise NotADecoderGraph(f"{source}: missing input {past_name(layer, kind)}")
                if present_name(layer, kind) not in outputs:
                    raise NotADecoderGraph(f"{source}: missing output {present_name(layer, kind)}")
        kv = inputs[past_name(0, "key")].type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in kv.shape.dim]
        if len(dims) != 4 or dims[1] is None or dims[3] is None:
            raise NotADecoderGraph(f"{source}: past KV must be [B,Hkv,P,D] with static Hkv and D, got {dims}")
        logit_dims = outputs[LOGITS].type.tensor_type.shape.dim
        vocab = logit_dims[-1].dim_value if logit_dims and logit_dims[-1].HasField("dim_value") else None
        return cls(len(layers), dims[1], dims[3], vocab, kv.elem_type, POSITION_IDS in inputs)


def step_feeds(contract: StepContract, token_ids, past: dict | None = None) -> dict:
    """Feeds of one contract step: ``token_ids`` [B,S] after ``past`` ({past name: [B,Hkv,P,D]}, None =
    empty), an all-ones mask and positions P..P+S-1 (when the graph takes them). The one place feeds of
    the contract form are built (runtime fallbacks, calibration, parity)."""
    import numpy as np

    ids = np.asarray(token_ids, np.int64)
    b, s = ids.shape
    if past is None:
        empty = np.zeros((b, contract.num_kv_heads, 0, contract.head_dim), np.float32)
        past = {past_name(layer, kind): empty for layer in range(contract.num_layers) for kind in ("key", "value")}
    p = past[past_name(0, "key")].shape[2]
    feeds = {INPUT_IDS: ids, ATTENTION_MASK: np.ones((b, p + s), np.int64)}
    if contract.position_ids:
        feeds[POSITION_IDS] = np.broadcast_to(np.arange(p, p + s, dtype=np.int64), (b, s)).copy()
    feeds.update(past)
    return feeds


def kv_window(folder: str | Path) -> int | None:
    """The sliding attention window the model's ``config.json`` declares (Mistral v0.1, Gemma 2, Phi-3...),
    None when it has none. Such exports mask keys by their distance to the step's cache position, which
    their shared-KV form misplaces (it derives the position from the buffer's capacity)."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    window = config.get("sliding_window") if isinstance(config, dict) else None
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0 or config.get("use_sliding_window") is False:
        return None
    return window


def exported_config(folder: str | Path | None) -> dict:
    """The model config that ``META_FILE`` records beside a graph we exported ({} for other exports and
    for no folder)."""
    path = None if folder is None else Path(folder) / META_FILE
    if path is None or not path.is_file():
        return {}
    from river.errors import read_json

    config = read_json(path).get("config", {})
    return config if isinstance(config, dict) else {}


def eos_token_ids(folder: str | Path | None, tokenizer) -> list[int]:
    """The ids that end generation: the exported config's, else the tokenizer's EOS token."""
    ids = list(exported_config(folder).get("eos_token_ids") or [])
    return ids or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
