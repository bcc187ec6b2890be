"""Export a diffusers ``UNet2DConditionModel`` to a static-shape ONNX graph.

The graph always has the same signature, whichever exporter wrote it::

    sample                 float32 [batch, 4, S, S]
    timestep               float32 [batch]
    encoder_hidden_states  float32 [batch, T, cross_attention_dim]
    -> out_sample          float32 [batch, 4, S, S]

With ``dtype="fp16"`` every one of them is float16: the model is cast with torch's ``.half()`` after
its weights are built (or loaded) in float32, and torch exports the fp16 module itself. torch 2.x runs
every op of the SD1.5 U-Net in float16 on CPU, so no fp32 -> fp16 conversion of the ONNX file is needed;
exporting the fp16 module keeps what torch computes in float32 on purpose (the timestep embedding's
frequencies, cast back to the sample's type) instead of converting every tensor blindly. An export that
fails in fp16 is a QuadcError naming the exporter's message.

``S`` is the config's ``sample_size`` and ``T`` its text-token count (:data:`configs.TEXT_TOKENS`).
Shapes are static: NPU graphs are.

Two exporters are supported:

* ``torchscript`` (``torch.onnx.export(dynamo=False)``, default opset 17). Conv and Gemm weights keep
  their parameter names; the weights of Linear layers on 3-D activations become anonymous, transposed
  ``onnx::MatMul_<n>`` initializers ``[d_in, d_out]``, the module path living only in the node name
  (``/down_blocks.0/.../attn1/to_q/MatMul``) and the bias in a following ``Add``.
* ``dynamo`` (``torch.onnx.export(dynamo=True)``, default opset 18). The exporter's own optimizer folds
  each Linear weight's ``Transpose`` into an anonymous ``val_<n>`` initializer; quadc renames the
  Transpose's output to the parameter name first, so every weight initializer is named after its
  parameter (``...attn1.to_q.weight``; for MatMul it holds the transposed ``[d_in, d_out]`` weight).
  Node metadata ``pkg.torch.onnx.stack_trace`` (source paths and line numbers) is dropped so that the
  output depends on the model only.

Same config, weights and seed give byte-identical files. Models whose weights exceed
:data:`quadc.graph.EMBED_MAX_BYTES` (SD1.5 in fp32) are written as ``<name>.onnx`` plus one
``<name>.onnx.data``, through :func:`quadc.graph.load_model`/:func:`quadc.graph.save_model`.
Everything is written in a temporary folder beside ``out`` and moved into place only when complete.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import onnx

from quadc.errors import QuadcError, require_extra
from quadc.export.configs import CONFIGS, TEXT_TOKENS, get_config
from quadc.graph import EMBED_MAX_BYTES, load_model, save_model

Progress = Callable[[str], None]

EXPORTERS = ("torchscript", "dynamo")
DEFAULT_OPSET = {"torchscript": 17, "dynamo": 18}
#: ``dtype`` choices of :func:`export_unet`: the float type of the exported weights, inputs and output.
DTYPES = ("fp32", "fp16")
#: Highest opset torch's TorchScript exporter emits directly; above it quadc converts with onnx.
TORCHSCRIPT_MAX_OPSET = 20
#: Node metadata keys the dynamo exporter writes that depend on source paths, not on the model.
_DROPPED_METADATA = ("pkg.torch.onnx.stack_trace",)
INPUT_NAMES = ("sample", "timestep", "encoder_hidden_states")
OUTPUT_NAME = "out_sample"
#: Below this many bytes a model may be converted with onnx.version_converter (protobuf's limit).
_PROTO_LIMIT = (2 << 30) - (64 << 20)


def _require_torch() -> None:
    require_extra("torch", "export")
    require_extra("diffusers", "export")


def _note(progress: Progress | None, message: str) -> None:
    if progress is not None:
        progress(message)


# ---------------------------------------------------------------------------------------------------
# Building the torch model
# ---------------------------------------------------------------------------------------------------

def _static_class(base: type) -> type:
    """A subclass of the U-Net class whose forward takes exactly the three graph inputs.

    Swapping the instance's class (instead of wrapping it in another module) keeps parameter names
    unprefixed: ``conv_in.weight``, not ``unet.conv_in.weight``.
    """

    class StaticUNet(base):  # type: ignore[misc, valid-type]
        def forward(self, sample, timestep, encoder_hidden_states):
            return base.forward(self, sample, timestep, encoder_hidden_states, return_dict=False)[0]

    StaticUNet.__name__ = StaticUNet.__qualname__ = "StaticUNet"
    return StaticUNet


def _perturb_degenerate(model: Any, seed: int) -> None:
    """Give every constant-valued parameter (zero biases, unit norm scales) small random values.

    diffusers initializes norm scales to 1 and norm biases to 0; with those a random model's LoRA,
    quantization and fusion checks would miss whole classes of bugs, and TorchScript would merge the
    identical tensors into one initializer behind ``Identity`` nodes.
    """
    import torch

    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, param in model.named_parameters():
            flat = param.detach().reshape(-1)
            if flat.numel() == 0 or not bool(torch.all(flat == flat[0])):
                continue
            noise = torch.randn(param.shape, generator=gen, dtype=torch.float32).to(param.dtype)
            if float(flat[0]) == 0.0:
                param.copy_(noise * 0.02)
            else:
                param.copy_(param * (1.0 + 0.1 * noise))


def _pretrained_dir(weights: str) -> Path:
    root = Path(weights).expanduser()
    if not root.exists():
        raise QuadcError(f"{root}: no such folder; pass 'random' or a local diffusers U-Net folder "
                         "(with config.json and diffusion_pytorch_model.safetensors)")
    if not root.is_dir():
        raise QuadcError(f"{root}: is a file; pass the diffusers folder that holds config.json and the weights")
    for candidate in (root, root / "unet"):
        if (candidate / "config.json").is_file():
            return candidate
    raise QuadcError(f"{root}: no config.json here or in {root / 'unet'}; pass a diffusers U-Net folder "
                     "(as written by UNet2DConditionModel.save_pretrained)")


def build_unet(config: str = "tiny", weights: str = "random", seed: int = 0) -> Any:
    """The diffusers U-Net in eval mode: deterministic random weights, or loaded from a local folder."""
    _require_torch()
    import torch
    from diffusers import UNet2DConditionModel

    cfg = get_config(config)
    if weights == "random":
        torch.manual_seed(seed)
        model = UNet2DConditionModel(**cfg)
        _perturb_degenerate(model, seed)
    else:
        folder = _pretrained_dir(weights)
        try:
            with _quiet():
                model = UNet2DConditionModel.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
            raise QuadcError(f"{folder}: not a loadable diffusers U-Net ({first})") from None
        want = cfg["cross_attention_dim"]
        got = model.config.cross_attention_dim
        if got != want:
            matching = [name for name, c in CONFIGS.items() if c["cross_attention_dim"] == got]
            hint = (f"pass config '{matching[0]}'" if matching else
                    "no config here has it (quadc export builds SD1.5-shaped U-Nets); export this U-Net with "
                    "torch.onnx.export and give quadc compile that ONNX file")
            raise QuadcError(f"{folder}: U-Net has cross_attention_dim {got} but config '{config}' expects {want}; "
                             f"{hint}")
        model = model.to(torch.float32)
    return model.eval()


def module_paths(config: str = "tiny") -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every ``nn.Linear`` and ``nn.Conv2d`` of the named U-Net config: path -> (kind, weight shape).

    ``kind`` is ``"linear"`` (weight ``(d_out, d_in)``) or ``"conv"`` (``(d_out, d_in, kh, kw)``). The
    model is built on the meta device, so this is cheap even for ``sd15``.
    """
    _require_torch()
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        model = UNet2DConditionModel(**get_config(config))
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            out[name] = ("linear", tuple(mod.weight.shape))
        elif isinstance(mod, torch.nn.Conv2d):
            out[name] = ("conv", tuple(mod.weight.shape))
    return out


def example_inputs(config: str = "tiny", batch: int = 1, seed: int = 0,
                   model_config: Any = None, dtype: str = "fp32") -> dict[str, Any]:
    """Deterministic numpy inputs with the exported graph's names, shapes and float type (``dtype``);
    the fp16 inputs are the fp32 ones rounded."""
    import numpy as np

    cfg = dict(model_config) if model_config is not None else get_config(config)
    rng = np.random.default_rng(seed)
    size = int(cfg["sample_size"])
    np_dtype = _np_float(dtype)
    return {
        "sample": rng.standard_normal((batch, int(cfg["in_channels"]), size, size)).astype(np.float32).astype(np_dtype),
        "timestep": np.full((batch,), 500.0, dtype=np_dtype),
        "encoder_hidden_states": rng.standard_normal(
            (batch, TEXT_TOKENS[config], int(cfg["cross_attention_dim"]))).astype(np.float32).astype(np_dtype),
    }


def _np_float(dtype: str) -> Any:
    import numpy as np

    if dtype not in DTYPES:
        raise QuadcError(f"unknown export dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    return np.float16 if dtype == "fp16" else np.float32


# ---------------------------------------------------------------------------------------------------
# Exporting
# ---------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporters' warnings and progress prints (quadc reports progress itself)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript",
                                              "diffusers", "torch.fx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _export_torchscript(model: Any, args: tuple, path: Path, opset: int) -> None:
    import torch

    with torch.no_grad(), _quiet():
        torch.onnx.export(model, args, str(path), dynamo=False, opset_version=opset,
                          input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                          do_constant_folding=True)


def _name_transposed_weights(ir_model: Any) -> int:
    """Rename each ``Transpose(parameter)`` output to the parameter's name before folding.

    The onnxscript optimizer folds ``Transpose(W)`` into a new initializer named after the Transpose's
    output (``val_115``); giving that output the parameter's name (and the parameter a temporary one)
    makes the folded, transposed initializer keep the real name.
    """
    renamed = 0
    graph = ir_model.graph
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain not in ("", "ai.onnx"):
            continue
        src = node.inputs[0]
        if src is None or not src.is_initializer() or len(src.uses()) != 1:
            continue
        if src.shape is None or len(src.shape) != 2:
            continue
        name = src.name
        src.name = f"{name}__quadc_untransposed"
        node.outputs[0].name = name
        renamed += 1
    return renamed


def _export_dynamo(model: Any, args: tuple, path: Path, opset: int, large: bool) -> None:
    import torch

    with torch.no_grad(), _quiet():
        program = torch.onnx.export(model, args, None, dynamo=True, optimize=False, opset_version=opset,
                                    input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                                    external_data=large, verbose=False)
        _name_transposed_weights(program.model)
        program.optimize()
        for node in program.model.graph:
            for key in _DROPPED_METADATA:
                node.metadata_props.pop(key, None)
        program.save(str(path), external_data=large)


def _normalize_proto(model: onnx.ModelProto) -> None:
    """Remove fields that vary between runs or machines rather than with the model."""
    for node in model.graph.node:
        keep = [p for p in node.metadata_props if p.key not in _DROPPED_METADATA]
        if len(keep) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(keep)


def _convert_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    from onnx import version_converter

    try:
        return version_converter.convert_version(model, opset)
    except Exception as exc:  # onnx raises plain RuntimeErrors from C++
        raise QuadcError(f"could not convert the exported graph to opset {opset} ({exc}); "
                         "use the default opset or the dynamo exporter") from None


def _opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _param_bytes(model: Any) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _unique_tmp_dir(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))


#: Above this many weight bytes a float16 TorchScript export gets a warning (the tiny U-Net traces in seconds;
#: the full SD1.5 U-Net's trace in float16 did not end within 8 minutes, its dynamo export took 35 s).
SLOW_FP16_TRACE_BYTES = 256 << 20


def export_unet(config: str = "tiny", weights: str = "random", exporter: str = "torchscript",
                out: str | os.PathLike[str] = "unet.onnx", opset: int | None = None, batch: int = 1,
                seed: int = 0, progress: Progress | None = None, dtype: str = "fp32") -> Path:
    """Export a U-Net (``config`` with random or local ``weights``) to a static-shape ONNX file ``out``.

    Returns ``out``. ``exporter`` is ``"torchscript"`` or ``"dynamo"``; ``opset`` defaults to 17 or 18
    respectively. Opsets above what the exporter emits (TorchScript stops at 20) are reached with
    ``onnx.version_converter``, which only models under 2 GB allow. ``dtype`` ``"fp16"`` exports the
    model cast to float16 (weights, inputs and output; the same weights as ``"fp32"``, rounded).
    ``progress`` receives one line per long step.
    """
    if exporter not in EXPORTERS:
        raise QuadcError(f"unknown exporter '{exporter}'; use one of {', '.join(EXPORTERS)}")
    _np_float(dtype)  # validate
    if batch < 1:
        raise QuadcError(f"batch must be at least 1, got {batch}")
    target_opset = DEFAULT_OPSET[exporter] if opset is None else int(opset)
    if not 13 <= target_opset <= 23:
        raise QuadcError(f"opset {target_opset} is not supported; use an opset from 13 to 23")
    out = Path(out)
    if out.suffix != ".onnx":
        raise QuadcError(f"{out}: the output file name must end in .onnx")
    get_config(config)  # validate the name before the slow imports
    _require_torch()
    import torch

    _note(progress, f"building the {config} U-Net ({'random weights, seed ' + str(seed) if weights == 'random' else weights})")
    model = build_unet(config, weights, seed)
    model.__class__ = _static_class(type(model))
    if dtype == "fp16":
        model = model.half()
    cfg = dict(model.config)
    inputs = example_inputs(config, batch, seed, model_config=cfg, dtype=dtype)
    args = tuple(torch.from_numpy(inputs[name]) for name in INPUT_NAMES)
    nbytes = _param_bytes(model)
    large = nbytes > EMBED_MAX_BYTES
    export_opset = target_opset
    convert_to: int | None = None
    if exporter == "torchscript" and target_opset > TORCHSCRIPT_MAX_OPSET:
        if nbytes >= _PROTO_LIMIT:
            raise QuadcError(f"the TorchScript exporter stops at opset {TORCHSCRIPT_MAX_OPSET} and a "
                             f"{nbytes / 2**30:.1f} GB model is too large for onnx's version converter; "
                             f"use exporter 'dynamo' for opset {target_opset}")
        export_opset, convert_to = DEFAULT_OPSET["torchscript"], target_opset

    if exporter == "torchscript" and dtype == "fp16" and nbytes > SLOW_FP16_TRACE_BYTES:
        _note(progress, f"warning: TorchScript traces by running the model once in float16 on the CPU, where torch "
                        f"has no fast float16 kernels (a 3x3 conv ran 300x slower than in float32 here): at "
                        f"{nbytes / 2**20:.0f} MiB this can take hours; the dynamo exporter does not run the model")
    work = _unique_tmp_dir(out)
    try:
        raw_dir = work / "raw"
        raw_dir.mkdir()
        raw = raw_dir / "model.onnx"
        _note(progress, f"exporting with the {exporter} exporter (opset {export_opset}, {dtype}, "
                        f"{nbytes / 2**20:.0f} MiB of weights)")
        try:
            if exporter == "torchscript":
                _export_torchscript(model, args, raw, export_opset)
            else:
                _export_dynamo(model, args, raw, export_opset, large)
        except QuadcError:
            raise
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [exc.__class__.__name__])[0]
            hint = "; try the other exporter" + (" or dtype fp32" if dtype == "fp16" else "")
            raise QuadcError(f"the {exporter} exporter failed in {dtype} ({first[:300]}){hint}") from exc
        del model
        staged = work / out.name
        if large:
            _note(progress, "writing weights into one external data file")
            graph = load_model(raw)
            save_model(graph, staged, external=True)
            _copy_node_metadata(raw, staged)
        else:
            proto = onnx.load(str(raw), load_external_data=True)
            _normalize_proto(proto)
            if convert_to is not None:
                _note(progress, f"converting opset {_opset_of(proto)} -> {convert_to}")
                proto = _convert_opset(proto, convert_to)
            with open(staged, "wb") as f:
                f.write(proto.SerializeToString(deterministic=True))
        _move_into_place(staged, out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _note(progress, f"wrote {out}")
    return out


def _copy_node_metadata(src: Path, dst: Path) -> None:
    """Put node metadata_props (dropped by onnx-graphsurgeon) from ``src`` back onto ``dst``'s nodes."""
    source = onnx.load(str(src), load_external_data=False)
    meta = {n.name: [p for p in n.metadata_props if p.key not in _DROPPED_METADATA]
            for n in source.graph.node if n.metadata_props}
    if not meta:
        return
    target = onnx.load(str(dst), load_external_data=False)
    for node in target.graph.node:
        props = meta.get(node.name)
        if props and not node.metadata_props:
            node.metadata_props.extend(props)
    with open(dst, "wb") as f:
        f.write(target.SerializeToString(deterministic=True))


def _move_into_place(staged: Path, out: Path) -> None:
    """Move ``staged`` (and its ``.data`` file) to ``out``, replacing any previous export there."""
    data_src = staged.with_name(staged.name + ".data")
    data_dst = out.with_name(out.name + ".data")
    if data_src.exists():
        os.replace(data_src, data_dst)
    elif data_dst.exists():
        data_dst.unlink()
    os.replace(staged, out)
