"""Decoder architectures in torch, their weight loaders, and the registry of named models.

Names load lazily: the registry's names are needed by torch-free commands, the model classes are not.
"""

from importlib import import_module

_HOMES = {"LlamaConfig": "river.models.config", "LlamaForCausalLM": "river.models.llama",
          "DEFAULT_MODEL": "river.models.registry", "LoadedModel": "river.models.registry",
          "available_models": "river.models.registry", "load_model": "river.models.registry"}
__all__ = list(_HOMES)


def __getattr__(name):
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'river.models' has no attribute {name!r}")
