"""Decoder architectures in torch, their weight loaders, and the registry of named models."""

from river.models.config import LlamaConfig
from river.models.llama import LlamaForCausalLM
from river.models.registry import (
    DEFAULT_MODEL,
    LoadedModel,
    available_models,
    load_model,
)

__all__ = ["LlamaConfig", "LlamaForCausalLM", "LoadedModel", "load_model", "available_models", "DEFAULT_MODEL"]
