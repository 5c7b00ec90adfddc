"""Lowerings per target: rewrites of a step or River graph for where it will run (shared-KV in place,
grouped-query attention without the ``repeat_kv`` copy, TensorRT preparation)."""
