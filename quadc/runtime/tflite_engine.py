"""TfliteEngine: one loaded LiteRT interpreter over a TFLite artifact (targets ``neuropilot`` / ``enn``).

A task switch rebinds the int8 LoRA input tensors (the task's stored bytes as they are, zeros for the
slots it does not adapt); the model is loaded once. Before each run the host part of the graph (the
sinusoidal timestep embedding, ``host.onnx``) is evaluated in numpy (onnx's reference evaluator) and fed
like any other input. Float inputs are quantized with each input tensor's scale and zero point (int16, or
int8 where the plan made the input 8-bit) and transposed
to its TFLite layout (4-D NCHW -> NHWC); outputs are dequantized and transposed back, so feeds and
results look exactly like those of the ONNX artifacts.

Example::

    engine = TfliteEngine("out/neuropilot")          # or quadc.runtime.Engine(...), which dispatches here
    y = engine.run(feeds, task="stickers")["out_sample"]
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quadc.artifact import artifact_file, read_manifest
from quadc.errors import QuadcError
from quadc.runtime.lora_store import LoadedTask, LoRAStore

BASE_TASKS = (None, "none")


def _quantize(x: np.ndarray, scale: float, dtype: np.dtype, zero_point: int = 0) -> np.ndarray:
    info = np.iinfo(dtype)
    return np.clip(np.rint(np.asarray(x, np.float64) / scale) + zero_point, info.min, info.max).astype(dtype)


def _dequantize(q: np.ndarray, scale: float, zero_point: int = 0) -> np.ndarray:
    return (q.astype(np.int32) - np.int32(zero_point)).astype(np.float32) * np.float32(scale)


class TfliteEngine:
    """LiteRT interpreter + host embedding + int8 LoRA tensors per task (a :class:`LoRAStore` bounded by
    ``cache_size`` tasks and ``cache_bytes`` bytes). ``run`` may be called from several threads: the
    interpreter runs one request at a time."""

    def __init__(self, artifact_dir: str | os.PathLike[str], *, cache_size: int | None = 4,
                 num_threads: int | None = None, cache_bytes: int | None = None):
        try:
            from ai_edge_litert.interpreter import Interpreter
        except ImportError:  # pragma: no cover - the tflite extra is not installed
            raise QuadcError("running a TFLite artifact needs ai-edge-litert: pip install 'quadc[tflite]'") from None
        self.dir = Path(artifact_dir)
        self.manifest = read_manifest(self.dir)
        if "tflite" not in self.manifest:
            raise QuadcError(f"{self.dir}: not a TFLite artifact (its manifest has no 'tflite' section)")
        path = artifact_file(self.dir, self.manifest["graph"], what="graph")
        if not path.is_file():
            raise QuadcError(f"{self.dir}: graph file '{self.manifest['graph']}' is missing; compile again")
        self.interpreter = Interpreter(model_path=str(path), num_threads=num_threads)
        self.interpreter.allocate_tensors()
        info = self.manifest["tflite"]
        by_name = {d["name"]: d for d in self.interpreter.get_input_details()}
        self._inputs = [(spec, by_name[spec["name"]]) for spec in info["inputs"]]
        out_details = self.interpreter.get_output_details()
        self._outputs = list(zip(info["outputs"], out_details, strict=True))
        self.output_names = [spec["name"] for spec in info["outputs"]]
        self.host = None
        if info.get("host_graph"):
            from quadc.targets.tflite.host import HostEmbedding

            self.host = HostEmbedding(artifact_file(self.dir, info["host_graph"], what="host graph"))
        host_outputs = set(self.host.output_names) if self.host else set()
        direct = [s["name"] for s, _ in self._inputs if s["kind"] == "model"]
        self.model_inputs = direct + [n for n in (self.host.input_names if self.host else []) if n not in direct]
        self._host_inputs = host_outputs
        self._zeros = {s["name"]: np.zeros(d["shape"], d["dtype"]) for s, d in self._inputs if s["kind"] == "lora"}
        self.store = LoRAStore({t: self.dir for t in self.tasks}, capacity=cache_size, max_bytes=cache_bytes,
                               loader=self._load_task)
        self._lock = threading.Lock()

    @property
    def loads(self) -> int:
        """How many times a task file was read."""
        return self.store.loads

    @property
    def tasks(self) -> list[str]:
        return list(self.manifest.get("tasks", {}))

    def _check_task(self, task: str) -> None:
        if task not in self.manifest.get("tasks", {}):
            raise QuadcError(f"unknown task '{task}'; this artifact has: {', '.join(self.tasks) or 'no tasks'}")

    def _load_task(self, task: str, _: Path) -> LoadedTask:
        """The store's loader: the task's stored int8 tensors, checked against the model's LoRA inputs."""
        from quadc.lora.pack import read_packed

        files = self.manifest["tasks"][task].get("files", {})
        if "safetensors" not in files:
            raise QuadcError(f"{self.dir}: task '{task}' has no safetensors file in the manifest; compile again")
        path = artifact_file(self.dir, files["safetensors"].get("path"), what=f"task '{task}' file")
        if not path.is_file():
            raise QuadcError(f"task '{task}': LoRA file {path} is missing; compile the artifact again")
        tensors = read_packed(path)
        for name, arr in tensors.items():
            want = self._zeros.get(name)
            if want is None or arr.shape != want.shape or arr.dtype != want.dtype:
                raise QuadcError(f"task '{task}': tensor '{name}' does not match the model's LoRA input; compile again")
        return LoadedTask(task, tensors, sum(a.nbytes for a in tensors.values()), tensors)

    def _task_tensors(self, task: str) -> Mapping[str, np.ndarray]:
        """The task's stored int8 tensors (read once, then cached)."""
        return self.store.get(task).values

    def lora_inputs(self, task: str | None) -> dict[str, np.ndarray]:
        """Every LoRA input's int8 tensor (TFLite layout) for ``task``: its file plus zeros elsewhere."""
        bound = dict(self._zeros)
        if task not in BASE_TASKS:
            self._check_task(task)
            bound.update(self._task_tensors(task))
        return bound

    def preload(self, tasks: Sequence[str]) -> None:
        """Load these tasks' tensors in the background (the base model needs none)."""
        self.store.preload([t for t in tasks if t not in BASE_TASKS])

    def run(self, feeds: Mapping[str, np.ndarray], task: str | None = None) -> dict[str, np.ndarray]:
        """One forward pass with ``task``'s LoRA bound (``None``/"none": the base model)."""
        missing = [n for n in self.model_inputs if n not in feeds]
        if missing:
            raise QuadcError(f"missing model input(s) {', '.join(missing)}; the graph needs {', '.join(self.model_inputs)}")
        values: dict[str, Any] = dict(feeds)
        if self.host is not None:
            values.update(self.host(feeds))
        lora = self.lora_inputs(task)
        with self._lock:  # one interpreter: set, invoke and read back as one step
            return self._invoke(values, lora)

    def _invoke(self, values: Mapping[str, Any], lora: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        for spec, detail in self._inputs:
            if spec["kind"] == "lora":
                data = lora[spec["name"]]
            else:
                arr = np.asarray(values[spec["name"]], np.float32)
                if list(arr.shape) != spec["shape"]:
                    raise QuadcError(f"input '{spec['name']}' has shape {list(arr.shape)}; the model takes {spec['shape']}")
                arr = arr.transpose(spec["perm"])
                data = _quantize(arr, spec["scale"], detail["dtype"], spec.get("zero_point") or 0) \
                    if spec.get("scale") else arr
            self.interpreter.set_tensor(detail["index"], np.ascontiguousarray(data))
        self.interpreter.invoke()
        out: dict[str, np.ndarray] = {}
        for spec, detail in self._outputs:
            raw = self.interpreter.get_tensor(detail["index"])
            val = _dequantize(raw, spec["scale"], spec.get("zero_point") or 0) if spec.get("scale") \
                else raw.astype(np.float32)
            out[spec["name"]] = np.ascontiguousarray(val.transpose(np.argsort(spec["perm"])))
        return out
