"""Export our torch decoder to one ONNX decode-step graph (serves prefill and decode).

TorchScript export keeps module scopes in node names (``/model/layers.N/self_attn/...``), the same
convention as Optimum's exports, which the compiler uses to find block boundaries.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import onnx
import torch

from river.atomic import atomic_dir
from river.export import contract
from river.export.contract import CAUSAL_PROP, META_FILE
from river.models.llama import LlamaForCausalLM
from river.models.registry import LoadedModel

OPSET = 17
MODEL_FILE = "model.onnx"


def export_step_graph(model: LlamaForCausalLM, path: str | Path, opset: int = OPSET) -> Path:
    """Write the step graph to ``path`` (weights as external data ``<path>.data``) and check it."""
    cfg = model.config
    path = Path(path)
    batch, seq, past = 1, 2, 3  # non-trivial sizes so no axis is traced as a constant
    args = [
        torch.randint(0, cfg.vocab_size, (batch, seq)),
        torch.ones(batch, past + seq, dtype=torch.int64),
        torch.arange(past, past + seq).unsqueeze(0),
    ]
    args += [torch.zeros(batch, cfg.num_kv_heads, past, cfg.head_dim) for _ in range(2 * cfg.num_layers)]
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            tuple(args),
            str(path),
            input_names=contract.input_names(cfg.num_layers),
            output_names=contract.output_names(cfg.num_layers),
            dynamic_axes=contract.dynamic_axes(cfg.num_layers),
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    proto = onnx.load(str(path), load_external_data=True)
    # the graph's causal rule compares key positions with position_ids (see additive_causal_mask):
    # its shared-KV form is then exact for multi-token steps too (speculative verification)
    onnx.helper.set_model_props(proto, {CAUSAL_PROP: "position"})
    onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    onnx.checker.check_model(str(path), full_check=True)
    return path


def export_model(loaded: LoadedModel, out_dir: str | Path, opset: int = OPSET) -> Path:
    """Export ``loaded`` into ``out_dir`` (model.onnx + .data, river_model.json, tokenizer files).

    Written into a temporary sibling folder and renamed into place: a failure leaves nothing behind.
    """
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        export_step_graph(loaded.model, tmp / MODEL_FILE, opset)
        meta = {"name": loaded.name, "source": loaded.source, "config": json.loads(loaded.model.config.to_json())}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(str(tmp))
        for f in tmp.iterdir():
            f.chmod(0o644)
    return out_dir / MODEL_FILE
