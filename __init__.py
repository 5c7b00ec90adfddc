"""River-LLM: training-free early exit for decoder LLMs over a shared KV cache.

Data flows one way: ``river.models`` -> ``river.export`` -> ``river.compiler`` -> ``river.runtime``.
"""

__version__ = "0.1.0"
