"""Target ``qnn``: Qualcomm HTP — an HTP-legal QDQ ONNX graph, its AIMET encodings and a QNN context
binary written by onnxruntime-qnn (:mod:`quadc.targets.qnn.target`)."""

from quadc.targets.qnn.target import QnnTarget

__all__ = ["QnnTarget"]
