"""Generation over shared KV buffers: backends (ONNX Runtime; later TensorRT and a torch reference)."""
