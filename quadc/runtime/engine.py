"""Engine: one loaded graph; a task switch binds that task's LoRA tensors, never reloads the model.

The executor is onnxruntime's CPU provider over the artifact's graph, or for an artifact with a QNN
context (target ``qnn``) that context on the HTP backend when onnxruntime-qnn is installed
(:mod:`quadc.runtime.qnn_engine`; ``executor="cpu"`` runs its QDQ graph on the CPU instead).

Example::

    engine = Engine("out/quadc")
    y1 = engine.run(feeds, task="stickers")["out_sample"]
    y0 = engine.run(feeds, task=None)["out_sample"]          # base model: zero LoRA

A task's LoRA tensors are fed as ordinary graph inputs from OrtValues built once when the task is loaded
(:class:`~quadc.runtime.lora_store.LoRAStore`); slots a task does not adapt get shared zero OrtValues.
Nothing is kept per run, so one Engine serves many threads at once (onnxruntime's ``run`` is thread-safe)
and a thread's outputs depend only on its own feeds and task. Binding ``onnxruntime.LoraAdapter``
objects through ``RunOptions.add_active_adapter`` instead needs what quadc's graphs do not have: the
public Python API accepts it only for inputs with initializer defaults, and onnxruntime ignores active
adapters in IOBinding runs. ``benchmarks/bench_runtime.py`` measures both ways on a copy of the graph
that has such defaults. :class:`BoundRunner` keeps one thread's IOBindings (reused input/output buffers,
one binding per cached task); :mod:`quadc.runtime.scheduler` runs requests on those.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from quadc.artifact import artifact_file, read_manifest
from quadc.errors import QuadcError
from quadc.graph import external_data_files
from quadc.runtime.lora_store import LoadedTask, LoRAStore, load_packed_task

BASE_TASKS = (None, "none")


class Engine:
    """One onnxruntime session over an artifact's graph plus a :class:`LoRAStore` for its tasks.

    A TFLite artifact (manifest ``runtime: litert``) gets a
    :class:`~quadc.runtime.tflite_engine.TfliteEngine` instead (same ``run``/``lora_inputs`` API).
    """

    def __new__(cls, artifact_dir: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        if cls is Engine and read_manifest(Path(artifact_dir)).get("runtime") == "litert":
            from quadc.runtime.tflite_engine import TfliteEngine

            if kwargs.get("executor", "auto") not in ("auto", "cpu"):
                raise QuadcError(f"executor '{kwargs['executor']}' cannot run this LiteRT artifact; "
                                 "use --executor auto or cpu")

            return TfliteEngine(artifact_dir, cache_size=kwargs.get("cache_size", 4),
                                cache_bytes=kwargs.get("cache_bytes"))
        return super().__new__(cls)

    def __init__(self, artifact_dir: str | os.PathLike[str], *,
                 providers: Sequence[str] = ("CPUExecutionProvider",),
                 provider_options: Sequence[dict[str, Any]] | None = None, cache_size: int | None = 4,
                 session_options: Any = None, executor: str = "auto", cache_bytes: int | None = None):
        """``cache_size``/``cache_bytes`` bound the LoRA cache in tasks and in bytes (``None``: unbounded)."""
        import onnxruntime as ort

        from quadc.runtime.qnn_engine import artifact_context_session, choose_executor

        self.dir = Path(artifact_dir)
        self.manifest = read_manifest(self.dir)
        explicit = session_options is not None or tuple(providers) != ("CPUExecutionProvider",)
        self.executor = choose_executor(self.manifest, "cpu" if explicit and executor == "auto" else executor)
        if self.executor == "qnn-htp":
            self.session = artifact_context_session(self.dir, self.manifest)
        else:
            graph = self.graph_path
            if not graph.is_file():
                raise QuadcError(f"{self.dir}: graph file '{self.manifest['graph']}' is missing; compile again")
            external_data_files(graph)  # its external data must lie inside the artifact too
            so = session_options or ort.SessionOptions()
            so.log_severity_level = 3
            self.session = ort.InferenceSession(str(graph), so, providers=list(providers),
                                                provider_options=provider_options)
        slots = self.manifest.get("lora_slots", [])
        tasks = self.manifest.get("tasks", {})
        specs = {side["name"]: side for slot in slots for side in (slot["down"], slot["up"])}
        self._zeros = {i.name: _zero_lora(i.shape, _np_type(i.type), specs[i.name])
                       for i in self.session.get_inputs() if i.name in specs}
        self._zero_values = {k: ort.OrtValue.ortvalue_from_numpy(v) for k, v in self._zeros.items()}
        self.store = LoRAStore({t: self.task_file(t) for t in tasks}, capacity=cache_size,
                               max_bytes=cache_bytes, loader=self._load_task)
        self.model_inputs = [i.name for i in self.session.get_inputs() if i.name not in self._zeros]
        self._input_specs = {i.name: (i.type, i.shape) for i in self.session.get_inputs() if i.name in self.model_inputs}
        slot_names = {s["module"]: (s["down"]["name"], s["up"]["name"]) for s in slots}
        self._task_inputs = {t: {n for m in e.get("modules", slot_names) for n in slot_names[m]}
                             for t, e in tasks.items()}
        self.output_names = [o.name for o in self.session.get_outputs()]

    @property
    def tasks(self) -> list[str]:
        return self.store.tasks

    @property
    def graph_path(self) -> Path:
        """The artifact's graph file (checked to lie inside the artifact)."""
        return artifact_file(self.dir, self.manifest["graph"], what="graph")

    def task_file(self, task: str, kind: str = "onnx_adapter") -> Path:
        """The ``kind`` file (``onnx_adapter`` or ``safetensors``) of ``task``, checked to lie inside the
        artifact."""
        files = self.manifest["tasks"][task].get("files", {})
        if kind not in files:
            raise QuadcError(f"{self.dir}: task '{task}' has no {kind} file in the manifest; compile again")
        return artifact_file(self.dir, files[kind].get("path"), what=f"task '{task}' {kind} file")

    def run(self, feeds: Mapping[str, np.ndarray], task: str | None = None) -> dict[str, np.ndarray]:
        """Run one forward pass with ``task``'s LoRA bound (``None``/"none": the base model).

        Float feeds are cast to the graph's float type, so an fp16 artifact takes float32 inputs too.
        Safe to call from several threads at once."""
        inputs: dict[str, Any] = self.model_feeds(feeds)
        inputs.update(self.lora_values(task))
        outputs = self.session.run(self.output_names, inputs)
        return dict(zip(self.output_names, outputs, strict=True))

    def model_feeds(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The graph's model inputs from ``feeds``, cast to the graph's types (:func:`as_input_type`); a
        QuadcError names any that are missing or whose shape or values the graph cannot take."""
        missing = [n for n in self.model_inputs if n not in feeds]
        if missing:
            raise QuadcError(f"missing model input(s) {', '.join(missing)}; the graph needs {', '.join(self.model_inputs)}")
        return {k: as_input_type(k, feeds[k], *self._input_specs[k]) for k in self.model_inputs}

    def lora_values(self, task: str | None) -> Mapping[str, Any]:
        """Every LoRA input's OrtValue for ``task`` (loaded through the cache; zeros for the base model)."""
        if task in BASE_TASKS:
            return self._zero_values
        return self.store.get(task).values

    def _load_task(self, task: str, path: Path) -> LoadedTask:
        """The store's loader: the task file's OrtValues plus the shared zeros of the slots it does not
        store; ``nbytes`` counts the task's own tensors only."""
        own = load_packed_task(task, path)
        unknown = sorted(set(own.values) - set(self._zero_values))
        if unknown:
            raise QuadcError(f"task '{task}': LoRA file {path} holds '{unknown[0]}', which is no LoRA input of "
                             "the graph; compile the artifact again")
        values = {k: v for k, v in self._zero_values.items() if k not in own.values}
        values.update(own.values)
        return LoadedTask(task, values, own.nbytes, own.owner)

    def runner(self) -> BoundRunner:
        """A :class:`BoundRunner` over this engine's session, for one thread."""
        return BoundRunner(self)

    def _unbound_zeros(self, task: str | None) -> dict[str, np.ndarray]:
        """The shared zero tensors of the slots ``task`` does not store (every slot for the base model)."""
        if task in BASE_TASKS:
            return dict(self._zeros)
        self.store.check(task)
        own = self._task_inputs[task]
        return {k: v for k, v in self._zeros.items() if k not in own}

    def lora_inputs(self, task: str | None) -> dict[str, np.ndarray]:
        """Every LoRA input's tensor for ``task`` as arrays (its file plus the zeros of the other slots),
        e.g. to feed the same values to another session."""
        from quadc.lora.pack import read_packed

        feeds = self._unbound_zeros(task)
        if task not in BASE_TASKS:
            feeds.update(read_packed(self.task_file(task)))
        return feeds

    def preload(self, tasks: Sequence[str]) -> None:
        """Load these tasks' LoRAs in the background (the base model needs none)."""
        self.store.preload([t for t in tasks if t not in BASE_TASKS])

    def close(self) -> None:
        """Wait for background LoRA loads and stop the store's worker thread."""
        self.store.close()


class BoundRunner:
    """One thread's IOBindings over an :class:`Engine`'s session, reusing their buffers between runs.

    Model inputs are copied into input buffers allocated once (per shape) and outputs of a static shape
    are written into output OrtValues allocated once. Each task gets its own IOBinding with its LoRA
    inputs bound once, all sharing those buffers, so a warm switch selects another binding instead of
    rebinding every LoRA input. A task's binding is dropped when the engine's LoRA cache no longer holds
    the task, so the bindings keep no LoRA tensors alive beyond the cache's bound. Not thread-safe: give
    each thread its own (``engine.runner()``).
    """

    def __init__(self, engine: Engine):
        import onnxruntime as ort

        self.engine = engine
        self.task: str | None = None
        self.switches = 0
        self._bound = False
        self._bindings: dict[str | None, tuple[Any, Mapping[str, Any]]] = {}
        self._inputs: dict[str, np.ndarray] = {}
        self._input_values: dict[str, Any] = {}
        self._outputs: dict[str, Any] = {}
        for out in engine.session.get_outputs():
            if out.type in _FLOAT_TYPES and all(isinstance(d, int) for d in out.shape):
                self._outputs[out.name] = ort.OrtValue.ortvalue_from_shape_and_type(out.shape, _FLOAT_TYPES[out.type])
            else:
                self._outputs[out.name] = None  # onnxruntime allocates it per run
        self.binding = self._binding_for(None)

    def _binding_for(self, task: str | None) -> Any:
        """The IOBinding of ``task``, made (or remade, if the cache reloaded the task) when needed."""
        values = self.engine.lora_values(task)
        held = self._bindings.get(task)
        if held is not None and held[1] is values:
            return held[0]
        binding = self.engine.session.io_binding()
        # The binding refers to the OrtValues' memory without owning it: ``values`` stays referenced with it.
        for name, value in (*values.items(), *self._input_values.items()):
            binding.bind_ortvalue_input(name, value)
        for name, value in self._outputs.items():
            if value is None:
                binding.bind_output(name)
            else:
                binding.bind_ortvalue_output(name, value)
        self._bindings[task] = (binding, values)
        cached = set(self.engine.store.cached())
        for other in [t for t in self._bindings if t is not None and t != task and t not in cached]:
            del self._bindings[other]
        return binding

    def bind_task(self, task: str | None) -> None:
        """Select ``task``'s binding (a no-op when it is already selected and still cached)."""
        task = None if task in BASE_TASKS else task
        self.binding = self._binding_for(task)
        self.switches += self._bound and task != self.task
        self.task, self._bound = task, True

    def run(self, feeds: Mapping[str, np.ndarray], task: str | None = None) -> dict[str, np.ndarray]:
        """One forward pass with ``task`` bound; returns copies the caller owns."""
        import onnxruntime as ort

        self.bind_task(task)
        for name, value in self.engine.model_feeds(feeds).items():
            arr = np.asarray(value)
            buf = self._inputs.get(name)
            if buf is None or buf.shape != arr.shape or buf.dtype != arr.dtype:
                buf = np.array(arr, copy=True)
                self._inputs[name] = buf
                self._input_values[name] = ort.OrtValue.ortvalue_from_numpy(buf)
                for binding, _ in self._bindings.values():
                    binding.bind_ortvalue_input(name, self._input_values[name])
            else:
                np.copyto(buf, arr)
        self.engine.session.run_with_iobinding(self.binding)
        values = self.binding.get_outputs()
        return {n: np.array(v.numpy(), copy=True) for n, v in zip(self.engine.output_names, values, strict=True)}


_FLOAT_TYPES = {"tensor(float)": np.dtype(np.float32), "tensor(float16)": np.dtype(np.float16)}


_INPUT_TYPES = {**_FLOAT_TYPES, "tensor(double)": np.dtype(np.float64), "tensor(int64)": np.dtype(np.int64),
                "tensor(int32)": np.dtype(np.int32)}


def as_input_type(name: str, value: Any, ort_type: str, shape: Sequence[Any] | None) -> Any:
    """``value`` as graph input ``name`` of onnxruntime type ``ort_type`` and ``shape`` takes it.

    Numbers are cast between widths and kinds: float64 arrays (numpy's default) to a float32 or float16
    input, an integer timestep to a float one, and a float timestep with whole values to an int64 one
    (optimum's export). A float with a fraction for an integer input, a wrong rank or a fixed dimension
    that differs is a one-line QuadcError, where onnxruntime raised a multi-line traceback.
    """
    arr = np.asarray(value)
    want = _INPUT_TYPES.get(ort_type)
    if want is not None and arr.dtype != want:
        if arr.dtype.kind not in "fiub":
            raise QuadcError(f"input '{name}' is {arr.dtype}; the graph takes {want}")
        if want.kind in "iu" and arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
                raise QuadcError(f"input '{name}' has non-integer {arr.dtype} values; the graph takes {want}")
        arr = arr.astype(want)
    if shape is not None:
        fixed = [d if isinstance(d, int) and d >= 0 else None for d in shape]
        if arr.ndim != len(fixed) or any(f is not None and f != d for f, d in zip(fixed, arr.shape, strict=False)):
            shown = [d if f is not None else str(d) for f, d in zip(fixed, shape, strict=True)]
            raise QuadcError(f"input '{name}' has shape {list(arr.shape)}; the graph takes {shown}")
    return arr


def _zero_lora(shape: Sequence[Any], dtype: Any, spec: Mapping[str, Any]) -> np.ndarray:
    """The base model's value of a LoRA input: zeros of the input's float type (float32 or float16, as the
    slot's packed task files), or for a quantized input (uint8 under a shared
    encoding) its zero point, which dequantizes to exactly 0."""
    if "dtype" in spec and np.dtype(spec["dtype"]) != np.dtype(dtype):
        raise QuadcError(f"LoRA input '{spec.get('name')}' is {np.dtype(dtype)} in the graph but {spec['dtype']} in "
                         "the manifest; the artifact is inconsistent, compile it again")
    zero = np.zeros(shape, dtype)
    if np.dtype(dtype).kind not in "iu":
        return zero
    if "zero_point" not in spec:
        raise QuadcError(f"LoRA input '{spec.get('name')}' is {np.dtype(dtype)} but the manifest gives no zero "
                         "point for it; compile the artifact again")
    zp = np.asarray(spec["zero_point"], dtype)
    if zp.ndim and "axis" in spec:
        target = [1] * zero.ndim
        target[int(spec["axis"]) % zero.ndim] = zp.size
        zp = zp.reshape(target)
    zero[...] = zp
    return zero


def _np_type(ort_type: str) -> Any:
    table = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(uint8)": np.uint8,
             "tensor(int8)": np.int8, "tensor(uint16)": np.uint16, "tensor(int16)": np.int16}
    if ort_type not in table:
        raise QuadcError(f"LoRA input type {ort_type} is not supported by the runtime")
    return table[ort_type]
