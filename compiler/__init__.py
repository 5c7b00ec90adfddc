"""ONNX -> ONNX passes over decode-step graphs (shared KV buffers; the River rewrite)."""
