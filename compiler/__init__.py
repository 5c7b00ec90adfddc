"""ONNX -> ONNX passes over decode-step graphs (DESIGN section 2):

- ``structure``: find the blocks of a step graph; ``graph_io``: the graph utilities every pass shares;
- ``river/``: the River rewrite (spec, manifest, gate, twin-kind registry, builder, and the nested,
  chained and segmented layouts);
- ``weight_quant``: whole-graph weight quantization (uniform baselines; ``draft_graph``, verify mode's draft);
- ``lowering/``: per-target rewrites (shared-KV in place, GQA without ``repeat_kv``, TensorRT preparation);
- ``tensorrt/``: TensorRT engine builds; ``calibrate``: exit thresholds from measured damage;
- ``compile``: ``river-export``'s job as a Python API.
"""
