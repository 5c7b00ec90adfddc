"""TensorRT: which package is installed (``package``), one engine build (``build``), and the engines
of a River model, fused and segmented (``engines``)."""
