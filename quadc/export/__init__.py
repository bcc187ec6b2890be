"""quadc.export: build a diffusers U-Net (random or local weights) and export it to static-shape ONNX.

torch and diffusers are optional (``pip install 'quadc[export]'``); they are imported only when an
export runs.
"""

from quadc.export.configs import CONFIGS, TEXT_TOKENS, get_config
from quadc.export.unet_export import (
    DEFAULT_OPSET,
    DTYPES,
    EXPORTERS,
    build_unet,
    example_inputs,
    export_unet,
    module_paths,
)

__all__ = [
    "CONFIGS", "DEFAULT_OPSET", "DTYPES", "EXPORTERS", "TEXT_TOKENS", "build_unet", "example_inputs", "export_unet",
    "get_config", "module_paths",
]
