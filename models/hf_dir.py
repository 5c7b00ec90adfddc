"""Hugging Face model directories (config.json + safetensors): load into our model, and write one.

Writing lets us hand our models to tools that expect a HF directory (transformers, Optimum).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from river.errors import InvalidModelFile, ModelNotFound, read_json
from river.models.config import LlamaConfig
from river.models.llama import LlamaForCausalLM


def is_hf_dir(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def load_hf_dir(path: str | Path) -> tuple[LlamaForCausalLM, LlamaConfig]:
    from safetensors.torch import load_file

    path = Path(path)
    if not is_hf_dir(path):
        raise ModelNotFound(f"{path} is not a Hugging Face model directory (no config.json)")
    raw = _read_config(path / "config.json")
    try:
        if raw.get("model_type") not in ("llama", "mistral", None) and "LlamaForCausalLM" not in raw.get("architectures", []):
            raise InvalidModelFile(f"{path}: model_type '{raw.get('model_type')}' is not a Llama-family decoder")
        cfg = LlamaConfig.from_hf_config(raw)
    except KeyError as exc:
        raise InvalidModelFile(f"{path}/config.json: no {exc}") from None
    except (TypeError, ValueError) as exc:
        raise InvalidModelFile(f"{path}/config.json: {exc}") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelNotFound(f"{path}: no *.safetensors weight files")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            sd.update(load_file(str(f)))
        except Exception as exc:
            raise InvalidModelFile(f"cannot read {f}: {exc}") from exc
    model = LlamaForCausalLM(cfg)
    sd = {k: v.to(torch.float32) for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # weight shapes that disagree with the config
        detail = str(exc).strip().splitlines()[-1].strip()
        raise InvalidModelFile(f"{path}: weights do not match config.json ({detail})") from None
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise InvalidModelFile(f"{path}: missing weights {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval(), cfg


def _read_config(path: Path) -> dict:
    """config.json as a dict, or an InvalidModelFile naming the file."""
    raw = read_json(path, InvalidModelFile)
    if not isinstance(raw, dict):
        raise InvalidModelFile(f"{path}: expected a JSON object, got {type(raw).__name__}")
    return raw


def save_hf_dir(model: LlamaForCausalLM, path: str | Path, tokenizer=None) -> Path:
    """Write config.json + model.safetensors (+ tokenizer files) readable by transformers<4.58."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    (path / "config.json").write_text(json.dumps(cfg.to_hf_config(), indent=2))
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_file(sd, str(path / "model.safetensors"), metadata={"format": "pt"})
    gen = {"bos_token_id": cfg.bos_token_id, "eos_token_id": list(cfg.eos_token_ids), "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))
    return path
