"""Qualcomm HTP through onnxruntime-qnn: compile a QDQ graph into a QNN context binary, and run one.

onnxruntime-qnn ships Qualcomm's HTP backend for x86 (an HTP simulator) as an onnxruntime plugin
execution provider. This module registers it once per process (:func:`qnn_devices`), builds the session
options quadc uses with it (HTP backend, graph-input quantization and graph-output dequantization kept on
HTP, ``session.disable_cpu_ep_fallback=1`` so that nothing silently runs on the CPU), writes a context
binary (:func:`compile_context`: ``ep.context_enable=1``, ``ep.context_file_path``,
``ep.context_embed_mode``) and opens one (:func:`context_session`).

When HTP refuses nodes, :func:`compile_context` says which (op types and a few node names), from a second
session that records where onnxruntime placed each node.
"""

from __future__ import annotations

import contextlib
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from quadc.errors import QuadcError

__all__ = ["EP_NAME", "compile_context", "context_session", "htp_provider_options", "htp_session_options",
           "qnn_available", "qnn_devices", "qnn_versions"]

EP_NAME = "QNNExecutionProvider"
#: Suffix onnxruntime gives the context binary next to ``<stem>.onnx`` in embed mode 0.
BINARY_SUFFIX = "_qnn.bin"


def qnn_available() -> tuple[bool, str]:
    """``(True, "")`` when onnxruntime-qnn is importable and onnxruntime takes plugin providers, else
    ``(False, why)``."""
    try:
        import onnxruntime as ort
        import onnxruntime_qnn  # noqa: F401
    except ImportError:
        return False, "onnxruntime-qnn is not installed (pip install 'quadc[qnn]')"
    if not hasattr(ort, "register_execution_provider_library") or not hasattr(ort, "get_ep_devices"):
        return False, f"onnxruntime {ort.__version__} cannot load plugin execution providers; upgrade it"
    return True, ""


def qnn_versions() -> dict[str, str]:
    """Versions of onnxruntime and onnxruntime-qnn."""
    import onnxruntime as ort
    import onnxruntime_qnn

    return {"onnxruntime": ort.__version__, "onnxruntime_qnn": getattr(onnxruntime_qnn, "__version__", "?")}


def qnn_devices() -> list[Any]:
    """The QNN execution provider's devices, registering its library first when needed."""
    ok, why = qnn_available()
    if not ok:
        raise QuadcError(f"the QNN HTP backend is not available: {why}")
    import onnxruntime as ort
    import onnxruntime_qnn

    if EP_NAME not in [d.ep_name for d in ort.get_ep_devices()]:
        try:
            ort.register_execution_provider_library(EP_NAME, onnxruntime_qnn.get_library_path())
        except Exception as exc:  # depends on the machine
            raise QuadcError(f"onnxruntime could not load the QNN execution provider: {exc}") from None
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        raise QuadcError("the QNN execution provider offers no device on this machine")
    return devices


@contextlib.contextmanager
def _native_stdout_to_stderr() -> Iterator[None]:
    """Send what native code prints to stdout (the HTP simulator announces its thread-local-storage
    setup there) to stderr instead, so quadc's own stdout stays its results."""
    import ctypes
    import sys

    if os.name != "posix":  # no C library handle to flush; leave stdout alone
        yield
        return
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def htp_provider_options(htp_arch: str | None = None, soc_model: str | None = None,
                         extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """QNN provider options: the HTP backend, graph I/O (de)quantization on HTP rather than on the CPU
    (``offload_graph_io_quantization=0``), and the chosen HTP architecture and SoC model."""
    opts = {"backend_type": "htp", "offload_graph_io_quantization": "0"}
    if htp_arch:
        opts["htp_arch"] = str(htp_arch)
    if soc_model:
        opts["soc_model"] = str(soc_model)
    opts.update({k: str(v) for k, v in (extra or {}).items()})
    return opts


def htp_session_options(provider_options: Mapping[str, str], *, strict: bool = True,
                        config: Mapping[str, str] | None = None) -> Any:
    """onnxruntime SessionOptions with the QNN provider (``provider_options``); ``strict`` disables the
    CPU fallback, so a session either runs every node on HTP or fails."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    if strict:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    so.add_provider_for_devices(qnn_devices()[:1], dict(provider_options))
    return so


def _refused_nodes(model: Path, provider_options: Mapping[str, str]) -> list[tuple[str, str]]:
    """(op type, node name) of every node onnxruntime does not place on QNN (fallback allowed)."""
    import onnxruntime as ort

    so = htp_session_options(provider_options, strict=False,
                             config={"session.record_ep_graph_assignment_info": "1"})
    sess = ort.InferenceSession(str(model), so)
    return [(n.op_type, n.name) for sub in sess.get_provider_graph_assignment_info() if sub.ep_name != EP_NAME
            for n in sub.get_nodes()]


def _explain_refusal(model: Path, provider_options: Mapping[str, str], error: Exception) -> QuadcError:
    try:
        refused = _refused_nodes(model, provider_options)
    except Exception:  # the diagnosis itself failed: report the original error
        refused = []
    if not refused:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return QuadcError(f"the QNN HTP backend could not compile {model.name}: {first}")
    # Q/DQ nodes are refused with the op they quantize: name the ops themselves when there are any.
    refused = [r for r in refused if r[0] not in ("QuantizeLinear", "DequantizeLinear")] or refused
    kinds = Counter(op for op, _ in refused)
    ops = ", ".join(f"{op} x{k}" for op, k in sorted(kinds.items()))
    names = ", ".join(repr(n) for _, n in refused[:3])
    return QuadcError(f"the QNN HTP backend does not run {len(refused)} node(s) of {model.name} ({ops}; e.g. {names}); "
                      "add the qnn legalization passes (qnn-gelu, qnn-groupnorm) to the pipeline or remove the op")


def _path_free_model(model: Path, so: Any) -> tuple[bytes, list[Any]]:
    """``model`` as bytes, its external weights handed to ``so`` as external initializers.

    onnxruntime names the compiled QNN graphs after a hash of the model's path when it has one, which
    would make the context binary depend on where the artifact was staged; a model given as bytes is
    named after its inputs, outputs and initializers instead, so the same graph gives the same binary.
    Returns the bytes and the arrays that must outlive the session's creation.
    """
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(model), load_external_data=False)
    names, values, keep = [], [], []
    for init in proto.graph.initializer:
        if init.data_location != onnx.TensorProto.EXTERNAL:
            continue
        from quadc.paths import resolve_inside

        location = {e.key: e.value for e in init.external_data}.get("location", "")
        resolve_inside(model.parent, location, what=f"external data of '{init.name}'", label=str(model))
        array = onnx.numpy_helper.to_array(init, base_dir=str(model.parent))
        keep.append(array)
        names.append(init.name)
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
    if names:
        so.add_external_initializers(names, values)
        keep.extend(values)
    return proto.SerializeToString(), keep


def compile_context(model: str | os.PathLike[str], context_model: str | os.PathLike[str],
                    provider_options: Mapping[str, str], *, embed: bool = False) -> dict[str, Any]:
    """Compile the QDQ ONNX ``model`` for HTP and write the QNN context: ``context_model`` (an ONNX graph
    of ``EPContext`` nodes) and, unless ``embed``, the context binary beside it
    (``<stem>_qnn.bin``). Every node must run on HTP (no CPU fallback). Returns manifest entries: file
    names, the ``ep_compatibility_info`` onnxruntime records, the provider options and versions.

    The compile runs in a fresh Python process: onnxruntime numbers the graphs it hands to an execution
    provider per process, and that number is written into the binary, so only a process that compiles
    nothing else gives the same bytes for the same graph every time (and a crash in the native backend
    cannot take quadc down with it).
    """
    import json
    import subprocess
    import sys
    import tempfile

    request = {"model": str(model), "context_model": str(context_model),
               "provider_options": dict(provider_options), "embed": bool(embed)}
    with tempfile.TemporaryDirectory(prefix="quadc-qnn-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        proc = subprocess.run([sys.executable, "-m", "quadc.runtime.qnn_engine", str(req), str(res)],
                              capture_output=True, text=True, check=False)
        if res.is_file():
            result = json.loads(res.read_text())
            if "error" in result:
                raise QuadcError(result["error"])
            return result["manifest"]
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
    raise QuadcError(f"the QNN context compile of {Path(model).name} failed: {tail[0]}")


def _compile_in_process(model: str | os.PathLike[str], context_model: str | os.PathLike[str],
                        provider_options: Mapping[str, str], embed: bool) -> dict[str, Any]:
    """:func:`compile_context`'s work, in the current process."""
    import onnx
    import onnxruntime as ort

    model, context_model = Path(model), Path(context_model)
    config = {"ep.context_enable": "1", "ep.context_file_path": str(context_model),
              "ep.context_embed_mode": "1" if embed else "0"}
    try:
        so = htp_session_options(provider_options, strict=True, config=config)
        data, keep = _path_free_model(model, so)
        ort.InferenceSession(data, so)
        del keep
    except QuadcError:
        raise
    except Exception as exc:
        raise _explain_refusal(model, provider_options, exc) from None
    if not context_model.is_file():
        raise QuadcError(f"onnxruntime-qnn wrote no context model at {context_model}")
    proto = onnx.load(str(context_model), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    binary = context_model.with_name(context_model.stem + BINARY_SUFFIX)
    nodes = [n for n in proto.graph.node if n.op_type == "EPContext"]
    leftover = sorted({n.op_type for n in proto.graph.node if n.op_type != "EPContext"})
    if leftover:
        raise QuadcError(f"the QNN context model still holds {', '.join(leftover)} nodes outside the context; "
                         "they would run on the CPU")
    return {
        "context_model": context_model.name,
        "context_binary": None if embed else binary.name,
        "embed_mode": 1 if embed else 0,
        "graphs": len(nodes),
        "ep_compatibility_info": meta.get(f"ep_compatibility_info.{EP_NAME}"),
        "provider_options": dict(sorted(provider_options.items())),
        **qnn_versions(),
    }


def check_context_files(artifact_dir: Path, context_model: Path) -> None:
    """Every context binary an ``EPContext`` node of ``context_model`` names (embed mode 0) must lie in
    ``artifact_dir``."""
    import onnx

    from quadc.paths import resolve_inside

    proto = onnx.load(str(context_model), load_external_data=False)
    for node in proto.graph.node:
        if node.op_type != "EPContext":
            continue
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if int(attrs.get("embed_mode", 1)) == 0:
            location = attrs.get("ep_cache_context", b"")
            location = location.decode() if isinstance(location, bytes) else str(location)
            target = resolve_inside(context_model.parent, location, what="QNN context binary",
                                    label=str(context_model))
            if not target.is_file() or not target.is_relative_to(artifact_dir.resolve()):
                raise QuadcError(f"{context_model}: QNN context binary '{location}' is missing; compile again")


def context_session(context_model: str | os.PathLike[str], provider_options: Mapping[str, str],
                    artifact_dir: str | os.PathLike[str] | None = None) -> Any:
    """An onnxruntime session over a QNN context model on HTP (no CPU fallback); its context binaries must
    lie in ``artifact_dir`` (default: the model's folder)."""
    import onnxruntime as ort

    context_model = Path(context_model)
    check_context_files(Path(artifact_dir or context_model.parent), context_model)
    so = htp_session_options(provider_options, strict=True)
    try:
        with _native_stdout_to_stderr():
            return ort.InferenceSession(str(context_model), so)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise QuadcError(f"the QNN HTP backend could not load {context_model.name}: {first}") from None


#: Executors of an artifact: ``cpu`` (its ONNX graph on onnxruntime's CPU provider) and ``qnn-htp`` (its
#: QNN context on the HTP backend); ``auto`` picks ``qnn-htp`` for an artifact with a QNN context when
#: onnxruntime-qnn is installed, else ``cpu``.
EXECUTORS = ("auto", "cpu", "qnn-htp")


def choose_executor(manifest: Mapping[str, Any], requested: str = "auto") -> str:
    """The executor that runs an artifact: ``requested``, or for ``auto`` the QNN context when the artifact
    has one and onnxruntime-qnn is installed, else the ONNX graph on the CPU."""
    if requested not in EXECUTORS:
        raise QuadcError(f"unknown executor '{requested}'; use one of {', '.join(EXECUTORS)}")
    has_context = isinstance(manifest.get("qnn"), Mapping)
    if requested == "qnn-htp":
        if not has_context:
            raise QuadcError(f"this artifact (target {manifest.get('target')}) has no QNN context; compile it with "
                             "--target qnn")
        ok, why = qnn_available()
        if not ok:
            raise QuadcError(f"cannot run the QNN context: {why}")
        return requested
    if requested == "auto":
        return "qnn-htp" if has_context and qnn_available()[0] else "cpu"
    return requested


def artifact_context_session(artifact_dir: str | os.PathLike[str], manifest: Mapping[str, Any]) -> Any:
    """The session over an artifact's QNN context model on HTP, with the provider options it was compiled
    with (every file checked to lie inside the artifact)."""
    from quadc.artifact import artifact_file

    info = manifest["qnn"]
    path = artifact_file(artifact_dir, info.get("context_model"), what="QNN context model")
    if not path.is_file():
        raise QuadcError(f"{artifact_dir}: QNN context model '{info.get('context_model')}' is missing; compile again")
    options = {str(k): str(v) for k, v in dict(info.get("provider_options") or {}).items()}
    return context_session(path, options or htp_provider_options(), artifact_dir)


def _main(argv: list[str]) -> int:
    """``python -m quadc.runtime.qnn_engine REQUEST.json RESULT.json``: one context compile (see
    :func:`compile_context`); the result or a one-line error is written as JSON."""
    import json

    request_path, result_path = Path(argv[0]), Path(argv[1])
    req = json.loads(request_path.read_text())
    try:
        manifest = _compile_in_process(req["model"], req["context_model"], req["provider_options"], req["embed"])
        result: dict[str, Any] = {"manifest": manifest}
    except QuadcError as exc:
        result = {"error": str(exc)}
    result_path.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":  # pragma: no cover - run by compile_context in a child process
    import sys

    sys.exit(_main(sys.argv[1:]))
