"""TFLite 16x8 backend shared by the ``neuropilot`` and ``enn`` targets.

- :mod:`.writer`: TFLite flatbuffers through the schema's object API (no TensorFlow);
- :mod:`.legalize`: pass ``tflite::legalize`` (static shapes, normalizations lowered) run before calibration;
- :mod:`.layout`: NCHW -> NHWC bookkeeping;
- :mod:`.convert`: ONNX -> TFLite op translation, float32 or fully integer 16x8;
- :mod:`.scheme`: ranges -> int16/int8 symmetric encodings (:func:`~.scheme.tflite_scheme`);
- :mod:`.host`: the timestep embedding, cut out and computed on the host in numpy;
- :mod:`.target`: the shared :class:`~.target.TfliteTarget` (emit, task files, verify).
"""
