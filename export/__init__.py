"""torch -> ONNX decode-step graphs that follow the contract of DESIGN section 3."""

from river.export.contract import StepContract
from river.export.onnx_export import export_model, export_step_graph

__all__ = ["StepContract", "export_model", "export_step_graph"]
