"""Read a LoRA file or adapter directory (diffusers, peft or kohya) into a :class:`~quadc.lora.model.LoRA`.

Everything is read through the ``safetensors`` library with numpy, never torch and never pickle. bf16
tensors (numpy has no bfloat16, and older safetensors releases cannot hand them to numpy) are read as raw
bytes from the file, decoded with ``ml_dtypes.bfloat16`` and widened to float32.
Every problem is a :class:`~quadc.errors.QuadcError` that names the file and the offending layer or tensor;
nothing is written anywhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from quadc.errors import QuadcError
from quadc.frontend.model_info import AttachPoint, ModelInfo
from quadc.lora import kohya_format, peft_format
from quadc.lora.model import KeyMap, LoRA, LoRALayer

_NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64}
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
_INT_DTYPES = ("I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_CONV_SUFFIXES = ("conv1", "conv2", "conv_shortcut", "conv_in", "conv_out")


class TensorFile:
    """An open safetensors file: keys, header metadata and float32 tensors with dtype/NaN checks."""

    def __init__(self, path: str) -> None:
        from safetensors import safe_open

        self.path = path
        try:
            self._cm = safe_open(path, framework="numpy")
            self._f = self._cm.__enter__()
        except Exception as e:  # SafetensorError, OSError, ...
            raise QuadcError(
                f"'{path}' is not a readable safetensors file ({e}); it may be truncated or another format — "
                "re-download it or convert it to .safetensors"
            ) from e
        self._raw_header: dict[str, Any] | None = None

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(None, None, None)

    def keys(self) -> list[str]:
        """The tensor names, in the file's order."""
        return list(self._f.keys())

    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` string map of the header (empty if none)."""
        return dict(self._f.metadata() or {})

    def dtype(self, key: str) -> str:
        """The safetensors dtype string (``F32``, ``BF16``, ...) of ``key``."""
        return str(self._f.get_slice(key).get_dtype())

    def _bf16(self, key: str) -> np.ndarray:
        if self._raw_header is None:
            with open(self.path, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                self._raw_header = {"__base__": 8 + n, **json.loads(fh.read(n))}
        entry = self._raw_header[key]
        start, end = entry["data_offsets"]
        with open(self.path, "rb") as fh:
            fh.seek(self._raw_header["__base__"] + start)
            raw = fh.read(end - start)
        return np.frombuffer(raw, dtype="<u2").view(ml_dtypes.bfloat16).reshape(entry["shape"])

    def get(self, key: str, *, allow_int: bool = False) -> np.ndarray:
        """``key`` as float32; a QuadcError for a non-float dtype or NaN/Inf values."""
        dtype = self.dtype(key)
        if dtype not in _FLOAT_DTYPES and not (allow_int and dtype in _INT_DTYPES):
            raise QuadcError(
                f"tensor '{key}' in '{self.path}' has dtype {dtype}; LoRA weights must be float "
                "(F16, BF16, F32 or F64) — re-save the LoRA in a float dtype"
            )
        arr = self._bf16(key) if dtype == "BF16" else self._f.get_tensor(key)
        arr = np.asarray(arr).astype(np.float32)
        if not np.isfinite(arr).all():
            bad = int(arr.size - np.isfinite(arr).sum())
            raise QuadcError(
                f"tensor '{key}' in '{self.path}' has {bad} NaN or Inf value(s) of {arr.size}; the LoRA is "
                "broken — re-export or retrain it"
            )
        return arr


def _resolve_path(path: Path) -> tuple[Path, Path | None]:
    """The weights file and the adapter config (if any) for a file or adapter directory."""
    if not path.exists():
        raise QuadcError(f"LoRA '{path}' does not exist; check the path")
    if path.is_dir():
        config = path / peft_format.CONFIG_FILE
        for name in peft_format.WEIGHT_FILES:
            if (path / name).is_file():
                return path / name, config if config.is_file() else None
        candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) == 1:
            return candidates[0], config if config.is_file() else None
        raise QuadcError(
            f"LoRA directory '{path}' has no {' or '.join(peft_format.WEIGHT_FILES)}"
            + (f" and {len(candidates)} other .safetensors files" if candidates else "")
            + "; pass the weights file itself"
        )
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise QuadcError(
            f"LoRA '{path}' is a pickled checkpoint, which quadc does not load (unsafe); convert it to "
            ".safetensors (safetensors.torch.save_file)"
        )
    return path, None


def _model_view(
    info: ModelInfo | Mapping[str, AttachPoint] | Iterable[str] | None,
) -> tuple[dict[str, str] | None, dict[str, AttachPoint]]:
    """Known kohya names and attach points from ``info``."""
    if info is None:
        return None, {}
    points: dict[str, AttachPoint] = {}
    if isinstance(info, ModelInfo):
        points = dict(info.points)
        modules: list[str] = list(points)
    elif isinstance(info, Mapping):
        points = {k: v for k, v in info.items() if isinstance(v, AttachPoint)}
        modules = list(info)
    else:
        modules = list(info)
    return kohya_format.known_names(modules), points


def _guess_kind(module: str, points: Mapping[str, AttachPoint]) -> tuple[str | None, tuple[int, int] | None]:
    """``(kind, kernel)`` of the target layer: from the attach point, else from diffusers naming."""
    if module in points:
        return points[module].kind, tuple(points[module].kernel)  # type: ignore[return-value]
    last = module.rsplit(".", 1)[-1]
    if last in _CONV_SUFFIXES or module.endswith(("samplers.0.conv", ".conv")):
        return "conv", None
    if last in ("proj_in", "proj_out"):
        return None, None  # Conv2d 1x1 in SD1.5, Linear with use_linear_projection
    return "linear", (1, 1)


def _build_layer(
    tf: TensorFile,
    module: str,
    roles: Mapping[str, str],
    config: Mapping[str, Any] | None,
    points: Mapping[str, AttachPoint],
    label: str,
) -> LoRALayer:
    where = f"{label}: layer '{module}'"
    for role, other in (("down", "up"), ("up", "down")):
        if role not in roles:
            raise QuadcError(
                f"{where} has only its {other} factor ('{roles[other]}') and no {role} factor; the file is "
                "incomplete — re-export the LoRA with both factors"
            )
    down = tf.get(roles["down"])
    up = tf.get(roles["up"])
    if down.ndim not in (2, 4) or up.ndim not in (2, 4):
        raise QuadcError(
            f"{where} has down {tuple(down.shape)} and up {tuple(up.shape)}; LoRA factors must be 2-D "
            "(linear) or 4-D (conv)"
        )
    if down.ndim == 4 and up.ndim == 2:
        up = up[:, :, None, None]
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise QuadcError(
            f"{where} has an up factor of shape {tuple(up.shape)}; only 1x1 up convs are supported "
            "(a LoCon up factor is [d_out, r, 1, 1])"
        )
    if down.ndim == 2 and up.ndim == 4:
        up = up[:, :, 0, 0]
    rank = int(down.shape[0])
    if rank == 0:
        raise QuadcError(
            f"{where} has rank 0 (down {tuple(down.shape)}, up {tuple(up.shape)}); the factors are empty — "
            "re-export the LoRA"
        )
    if up.shape[1] != rank:
        raise QuadcError(
            f"{where} has rank {rank} in its down factor {tuple(down.shape)} ('{roles['down']}') but "
            f"{up.shape[1]} in its up factor {tuple(up.shape)} ('{roles['up']}'); the A/B ranks must match — "
            "the file is corrupt or mixes two LoRAs"
        )
    kind, kernel = _guess_kind(module, points)
    if down.ndim == 4 and kind == "linear" and tuple(down.shape[2:]) == (1, 1):
        down, up = down[:, :, 0, 0], up[:, :, 0, 0]
    elif down.ndim == 2 and kind == "conv" and kernel == (1, 1):
        down, up = down[:, :, None, None], up[:, :, None, None]

    rslora = peft_format.config_flag(config, "use_rslora", where) if config else False
    if "alpha" in roles:
        alpha_arr = tf.get(roles["alpha"], allow_int=True)
        if alpha_arr.size != 1:
            raise QuadcError(
                f"{where}: alpha tensor '{roles['alpha']}' has shape {tuple(alpha_arr.shape)}; alpha must be "
                "a scalar"
            )
        alpha = float(alpha_arr.reshape(()))
    elif config is not None and peft_format.configured_alpha(config, module) is not None:
        alpha = float(peft_format.configured_alpha(config, module))  # type: ignore[arg-type]
    else:
        alpha = float(rank)
    if config is not None:
        expected = peft_format.configured_rank(config, module)
        if expected is not None and expected != rank:
            raise QuadcError(
                f"{where} has rank {rank} in the file but the adapter config says r={expected} "
                "(r / rank_pattern); the config does not belong to these weights — pass the matching config"
            )
    return LoRALayer(module=module, up=up, down=down, alpha=alpha, rank=rank, rslora=rslora)


def read_lora(
    path: str | os.PathLike[str],
    name: str | None = None,
    *,
    config_path: str | os.PathLike[str] | None = None,
    info: ModelInfo | Mapping[str, AttachPoint] | Iterable[str] | None = None,
) -> LoRA:
    """Read a LoRA (diffusers / peft / kohya safetensors file, or a peft adapter directory).

    ``name`` defaults to the file stem (or directory name). ``config_path`` is a peft
    ``adapter_config.json`` for a bare weights file. ``info`` (a :class:`ModelInfo`, its ``points`` or a
    list of module paths) lets kohya names be mapped exactly and 1x1 factors be shaped for their target.
    """
    given = Path(os.fspath(path))
    weights, dir_config = _resolve_path(given)
    if name is None:
        name = given.name if given.is_dir() else given.stem
    known, points = _model_view(info)
    with TensorFile(str(weights)) as tf:
        keys = tf.keys()
        label = f"LoRA '{weights}'"
        if any(kohya_format.is_kohya_key(k) for k in keys):
            found: KeyMap = kohya_format.parse_keys(keys, known)
            fmt = "kohya"
        else:
            found = peft_format.parse_keys(keys)
            fmt = (
                "peft"
                if dir_config is not None or any(k.startswith("base_model.model.") for k in keys)
                else "diffusers"
            )
        if found.unsupported:
            key, feature = next(iter(found.unsupported.items()))
            raise QuadcError(
                f"{label} uses {feature} (tensor '{key}'), which quadc does not support; use a plain LoRA "
                "(down/up factors only)"
            )
        real_layers = {m: r for m, r in found.layers.items() if set(r) - {"alpha"}}
        if not real_layers:
            if found.ignored:
                raise QuadcError(
                    f"{label} only has text-encoder LoRA tensors ({len(found.ignored)} keys, e.g. "
                    f"'{found.ignored[0]}'); quadc compiles U-Net LoRAs — use a LoRA that adapts the U-Net"
                )
            sample = ", ".join(f"'{k}'" for k in keys[:3]) or "none"
            raise QuadcError(
                f"{label} has no LoRA tensors (keys: {sample}); expected diffusers/peft "
                "'<module>.lora_A.weight' or kohya 'lora_unet_<module>.lora_down.weight' keys"
            )
        pasted = [k for k in found.unknown if peft_format.is_lora_key(k)] if fmt == "kohya" else []
        if pasted:
            raise QuadcError(
                f"{label} mixes kohya 'lora_unet_...' keys and diffusers/peft keys (e.g. '{pasted[0]}'); "
                "one file must use one key style — save each LoRA in its own file"
            )
        if found.unknown:
            raise QuadcError(
                f"{label} has tensor '{found.unknown[0]}' that is not a LoRA factor or alpha"
                + (f" (and {len(found.unknown) - 1} more)" if len(found.unknown) > 1 else "")
                + "; quadc reads plain LoRA files — remove the extra tensors"
            )
        config: dict[str, Any] | None = None
        config_source = None
        if fmt != "kohya":
            if config_path is not None:
                config, config_source = peft_format.load_config(config_path), os.fspath(config_path)
            elif dir_config is not None:
                config, config_source = peft_format.load_config(dir_config), str(dir_config)
            else:
                config = peft_format.config_from_metadata(tf.metadata())
                config_source = "safetensors metadata" if config is not None else None
            if config is not None:
                peft_format.check_config(config, f"{label} (config {config_source})")
        elif config_path is not None:
            raise QuadcError(
                f"{label} is a kohya LoRA, which carries its own alphas; drop config_path (it is for peft "
                "adapters)"
            )
        layers = {
            module: _build_layer(tf, module, roles, config, points, label)
            for module, roles in real_layers.items()
        }
        meta: dict[str, Any] = {
            "weights_file": str(weights),
            "key_style": found.style,
            "ignored_text_encoder_keys": len(found.ignored),
            "ignored_alpha_only_layers": len(found.layers) - len(real_layers),
            "file_metadata": tf.metadata(),
        }
        if config is not None:
            meta["config"] = config
            meta["config_source"] = config_source
    return LoRA(name=name, layers=layers, source=str(given), format=fmt, meta=meta)
