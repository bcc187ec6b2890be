"""quadc.quant: quantization math (:mod:`quadc.quant.affine`) and AIMET encodings files (:mod:`quadc.quant.encodings`)."""

from quadc.quant.affine import (
    MIN_SCALE,
    Encoding,
    QType,
    compute_encoding,
    dequantize,
    encoding_from_tensor,
    fake_quant,
    merge_ranges,
    quantize,
    sqnr_db,
    sqnr_db_from_sums,
)
from quadc.quant.encodings import (
    ENCODINGS_VERSION,
    EncodingsFile,
    encodings_from_dict,
    encodings_to_dict,
    read_encodings,
    write_encodings,
)

__all__ = [
    "ENCODINGS_VERSION",
    "MIN_SCALE",
    "Encoding",
    "EncodingsFile",
    "QType",
    "compute_encoding",
    "dequantize",
    "encoding_from_tensor",
    "encodings_from_dict",
    "encodings_to_dict",
    "fake_quant",
    "merge_ranges",
    "quantize",
    "read_encodings",
    "sqnr_db",
    "sqnr_db_from_sums",
    "write_encodings",
]
