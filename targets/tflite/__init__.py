"""TFLite 16x8 backend shared by the ``neuropilot`` and ``enn`` targets.

- :mod:`.writer`: TFLite flatbuffers through the schema's object API (no TensorFlow);
- :mod:`.legalize`: pass ``tflite::legalize`` (static shapes, normalizations lowered) run before calibration;
- :mod:`.layout`: NCHW -> NHWC bookkeeping;
- :mod:`.convert`: ONNX -> TFLite op translation, float32 or fully integer 16x8;
- :mod:`.scheme`: ranges -> int16/int8 symmetric encodings (:func:`~.scheme.tflite_scheme`);
- :mod:`.host`: the timestep embedding, cut out and computed on the host in numpy;
- :mod:`.target`: the shared :class:`~.target.TfliteTarget` (emit, task files, verify).

Why quadc writes the 16x8 model itself rather than with ``litert-quantizer`` (0.11.0 installs here; it
quantizes a float TFLite with its ``a16w8`` recipe and accepts externally computed min/max per tensor
name as its calibration result): it quantizes every subgraph input as an int16 activation, so the LoRA
factors would not be int8 zero-point-0 inputs whose stored bytes bind as they are; its biases are int64;
it resolves concatenation scales by inserting QUANTIZE ops instead of sharing one scale. quadc's writer
takes every encoding from the one plan (QSS-chosen LoRA ranges included), writes deterministic bytes and
needs no extra dependency.
"""
