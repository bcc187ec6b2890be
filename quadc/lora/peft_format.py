"""diffusers / peft LoRA key names and adapter configs.

Key styles read (``<module>`` is the dotted diffusers path, e.g.
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q``):

* peft (``get_peft_model_state_dict``, ``unet.save_lora_adapter``): ``<module>.lora_A.weight`` (down,
  ``[r, d_in]``) and ``<module>.lora_B.weight`` (up, ``[d_out, r]``); ``PeftModel.save_pretrained`` adds
  ``base_model.model.``; diffusers' ``save_lora_weights`` adds ``unet.``. A raw ``state_dict()`` keeps the
  adapter name: ``<module>.lora_A.default.weight``.
* older diffusers (``convert_state_dict_to_diffusers``): ``<module>.lora.down.weight`` / ``.lora.up.weight``,
  and ``<module>.lora_linear_layer.down.weight``.
* diffusers attention processors: ``<attn>.processor.to_q_lora.down.weight`` (``to_out_lora`` is
  ``to_out.0``).
* optional per-layer ``<module>.alpha`` scalars.

Alpha comes from an ``.alpha`` tensor, else from the peft config (``adapter_config.json``, or the
``lora_adapter_metadata`` JSON that diffusers stores in the safetensors header, plain or with ``unet.``
prefixed keys): ``alpha_pattern`` / ``lora_alpha``, ``use_rslora``. With neither, alpha = rank.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any

from quadc.errors import QuadcError
from quadc.lora.model import KeyMap
from quadc.options import parse_bool

#: Weight file names looked for inside an adapter directory, in order.
WEIGHT_FILES = ("adapter_model.safetensors", "pytorch_lora_weights.safetensors")
CONFIG_FILE = "adapter_config.json"
METADATA_KEY = "lora_adapter_metadata"

_PREFIXES = ("base_model.model.", "unet.")
_TEXT_PREFIXES = ("text_encoder.", "text_encoder_2.", "te.", "te1.", "te2.", "text_model.")

_AB = re.compile(r"^(?P<m>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[A-Za-z0-9_\-]+))?\.weight$")
_UPDOWN = re.compile(r"^(?P<m>.+)\.(?:lora|lora_linear_layer)\.(?P<ud>down|up)\.weight$")
_PROCESSOR = re.compile(r"^(?P<m>.+)\.processor\.(?P<p>to_q|to_k|to_v|to_out)_lora\.(?P<ud>down|up)\.weight$")
_ALPHA = re.compile(r"^(?P<m>.+)\.alpha$")
_UNSUPPORTED = (
    (re.compile(r"\.lora_magnitude_vector(\.|$)"), "DoRA (use_dora)"),
    (re.compile(r"\.lora_[AB](\.[A-Za-z0-9_\-]+)?\.bias$"), "LoRA biases (lora_bias)"),
    (re.compile(r"\.lora_embedding_[AB](\.|$)"), "embedding LoRA"),
    (re.compile(r"\.lora_E(\.|$)"), "AdaLoRA"),
)

_AB_ROLE = {"A": "down", "B": "up"}


def _strip_prefixes(key: str) -> str:
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def is_text_encoder_key(key: str) -> bool:
    """True for keys that belong to a text encoder (which the U-Net compiler ignores)."""
    key = key.removeprefix("base_model.model.")
    return key.startswith(_TEXT_PREFIXES)


def is_lora_key(key: str) -> bool:
    """True if ``key`` looks like a diffusers/peft LoRA factor."""
    return bool(_AB.match(key) or _UPDOWN.match(key) or _PROCESSOR.match(key))


def _check_one_adapter(adapters: set[str]) -> None:
    """A QuadcError once the keys name more than one peft adapter."""
    if len(adapters) > 1:
        raise QuadcError(
            f"the file holds several peft adapters ({', '.join(sorted(adapters))}); "
            "save each adapter to its own file"
        )


def parse_keys(keys: Iterable[str]) -> KeyMap:
    """Group diffusers/peft tensor keys by module path (see the module docstring for the styles)."""
    found = KeyMap()
    styles: set[str] = set()
    adapters: set[str] = set()
    for key in keys:
        if is_text_encoder_key(key):
            found.ignored.append(key)
            continue
        name = _strip_prefixes(key)
        feature = next((what for pattern, what in _UNSUPPORTED if pattern.search(name)), None)
        if feature is not None:
            found.unsupported[key] = feature
            continue
        if m := _AB.match(name):
            if m["adapter"]:
                adapters.add(m["adapter"])
                _check_one_adapter(adapters)
            found.put(m["m"], _AB_ROLE[m["ab"]], key)
            styles.add("lora_A/lora_B")
        elif m := _PROCESSOR.match(name):
            proj = "to_out.0" if m["p"] == "to_out" else m["p"]
            found.put(f"{m['m']}.{proj}", m["ud"], key)
            styles.add("processor.to_*_lora")
        elif m := _UPDOWN.match(name):
            found.put(m["m"], m["ud"], key)
            styles.add("lora.down/lora.up")
        elif m := _ALPHA.match(name):
            found.put(m["m"], "alpha", key)
        else:
            found.unknown.append(key)
    found.style = "+".join(sorted(styles))
    return found


def load_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a peft ``adapter_config.json``; a QuadcError if it is missing or not a JSON object."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise QuadcError(f"peft adapter config '{path}' does not exist; check the config path")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise QuadcError(f"peft adapter config '{path}' is not valid JSON ({e}); fix or regenerate it") from e
    if not isinstance(config, dict):
        raise QuadcError(f"peft adapter config '{path}' is not a JSON object; fix or regenerate it")
    return config


def config_from_metadata(metadata: Mapping[str, str] | None) -> dict[str, Any] | None:
    """The peft config diffusers stores in a safetensors header (``lora_adapter_metadata``), if any.

    ``unet.save_lora_adapter`` stores it plain; ``save_lora_weights`` prefixes keys with ``unet.`` (and
    ``text_encoder.`` for the text encoder's, which are dropped here).
    """
    raw = (metadata or {}).get(METADATA_KEY)
    if not raw:
        return None
    try:
        data = json.loads(raw)
    except json.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    if any(k.startswith("unet.") for k in data):
        return {k[len("unet.") :]: v for k, v in data.items() if k.startswith("unet.")}
    if any(k.startswith(("text_encoder.", "text_encoder_2.")) for k in data):
        return None
    return data


def _pattern_value(patterns: Mapping[str, Any] | None, module: str) -> Any:
    """peft's ``get_pattern_key``: the first pattern key ``k`` with ``re.match(rf"(.*\\.)?({k})$", module)``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def configured_rank(config: Mapping[str, Any], module: str) -> int | None:
    """The rank the peft config gives ``module`` (``rank_pattern``, else ``r``), or None."""
    value = _pattern_value(config.get("rank_pattern"), module)
    if value is None:
        value = config.get("r")
    return int(value) if value is not None else None


def configured_alpha(config: Mapping[str, Any], module: str) -> float | None:
    """The alpha the peft config gives ``module`` (``alpha_pattern``, else ``lora_alpha``), or None."""
    value = _pattern_value(config.get("alpha_pattern"), module)
    if value is None:
        value = config.get("lora_alpha")
    return float(value) if value is not None else None


def config_flag(config: Mapping[str, Any], key: str, where: str) -> bool:
    """A boolean of the peft config (missing or null: false), parsed by :func:`quadc.options.parse_bool`,
    so a hand-written ``"false"`` string is false rather than a truthy non-empty string."""
    value = config.get(key)
    return False if value is None else parse_bool(value, f"{where}: {key}")


def check_config(config: Mapping[str, Any], where: str) -> None:
    """A QuadcError for peft config features quadc cannot compile (DoRA, LoRA biases, non-LoRA types)."""
    peft_type = config.get("peft_type")
    if peft_type not in (None, "LORA"):
        raise QuadcError(
            f"{where}: peft_type is '{peft_type}'; quadc only compiles plain LoRA adapters (peft_type LORA)"
        )
    if config_flag(config, "use_dora", where):
        raise QuadcError(f"{where}: the adapter uses DoRA (use_dora=true), which quadc does not support")
    if config_flag(config, "lora_bias", where):
        raise QuadcError(
            f"{where}: the adapter trains LoRA biases (lora_bias=true), which quadc does not support"
        )
    if config_flag(config, "fan_in_fan_out", where):
        raise QuadcError(
            f"{where}: fan_in_fan_out=true is for Conv1D (GPT-2 style) layers, not a diffusers U-Net"
        )


def peft_key(module: str, role: str, prefix: str = "") -> str:
    """The peft tensor key for ``role`` (``down``/``up``) of ``module``, e.g. ``<prefix><module>.lora_A.weight``."""
    return f"{prefix}{module}.lora_{'A' if role == 'down' else 'B'}.weight"
