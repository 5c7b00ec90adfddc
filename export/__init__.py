"""torch -> ONNX decode-step graphs that follow the contract of DESIGN section 3.

``river.export.contract`` (the contract itself) is torch-free and read by the runtime; the exporter
loads torch, so it is imported on first use.
"""

from importlib import import_module

_HOMES = {"StepContract": "river.export.contract", "export_model": "river.export.onnx_export",
          "export_step_graph": "river.export.onnx_export"}
__all__ = list(_HOMES)


def __getattr__(name):
    if name in _HOMES:
        return getattr(import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'river.export' has no attribute {name!r}")
