"""kohya-ss / A1111 / LyCORIS-LoCon LoRA key names.

A kohya key is ``<name>.<suffix>`` where ``name`` is ``lora_unet_`` plus the diffusers module path with
every ``.`` replaced by ``_`` (sd-scripts does exactly that for SD1.x, which it trains on the diffusers
U-Net), e.g. ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0``, and ``suffix``
is ``lora_down.weight`` (down, ``[r, d_in]`` or ``[r, d_in, kh, kw]``), ``lora_up.weight`` (up,
``[d_out, r]`` or ``[d_out, r, 1, 1]``) or ``alpha`` (scalar; scale = alpha / rank; missing means
alpha = rank). Text-encoder names start with ``lora_te_``/``lora_te1_``/``lora_te2_`` and are ignored.

Mapping a name back to a dotted path is ambiguous because diffusers names contain ``_`` too. With the
model's module paths known, the name is looked up exactly; otherwise :func:`kohya_to_module` rebuilds it
from the underscore-joined identifiers diffusers uses (``down_blocks``, ``transformer_blocks``, ``to_out``,
``proj_in``, ``time_emb_proj``, ``conv_shortcut``, ``time_embedding`` + ``linear_1``, ...).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from quadc.lora.model import KeyMap

UNET_PREFIX = "lora_unet_"
TEXT_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "lora_te3_")

_ROLE = {"lora_down.weight": "down", "lora_up.weight": "up", "alpha": "alpha"}
_UNSUPPORTED = (
    (re.compile(r"^hada_"), "LoHa (LyCORIS)"),
    (re.compile(r"^lokr_"), "LoKr (LyCORIS)"),
    (re.compile(r"^lora_mid\."), "LoCon with Tucker decomposition (lora_mid)"),
    (re.compile(r"^dora_scale$"), "DoRA"),
    (re.compile(r"^(diff|diff_b|b_norm|w_norm)$"), "full-weight diffs"),
    (re.compile(r"^(oft_|oft_blocks|rescale)"), "OFT/BOFT"),
    (re.compile(r"^(ia3|on_input)"), "IA3"),
)

#: diffusers identifiers that contain ``_`` (longest first when matching).
ATOMS: tuple[str, ...] = tuple(
    sorted(
        {
            "down_blocks",
            "up_blocks",
            "mid_block",
            "transformer_blocks",
            "to_q",
            "to_k",
            "to_v",
            "to_out",
            "add_k_proj",
            "add_v_proj",
            "proj_in",
            "proj_out",
            "time_emb_proj",
            "conv_shortcut",
            "conv_in",
            "conv_out",
            "conv_norm_out",
            "time_embedding",
            "add_embedding",
            "class_embedding",
            "encoder_hid_proj",
            "linear_1",
            "linear_2",
            "cond_proj",
            "post_act",
        },
        key=lambda a: (-a.count("_"), a),
    )
)


def is_kohya_key(key: str) -> bool:
    """True for kohya-style keys (``lora_unet_...`` or ``lora_te..._...``)."""
    return key.startswith((UNET_PREFIX, *TEXT_PREFIXES))


def module_to_kohya(module: str) -> str:
    """The kohya layer name of a diffusers module path: ``lora_unet_`` + path with ``.`` -> ``_``."""
    return UNET_PREFIX + module.replace(".", "_")


def kohya_to_module(name: str, known: Mapping[str, str] | None = None) -> str:
    """The dotted diffusers path for kohya layer ``name`` (with or without ``lora_unet_``).

    ``known`` maps underscore names to module paths (see :func:`known_names`); a name found there wins.
    Otherwise the name is rebuilt from diffusers' identifiers: ``ff_net_0_proj`` -> ``ff.net.0.proj``,
    ``to_out_0`` -> ``to_out.0``, ``time_embedding_linear_1`` -> ``time_embedding.linear_1``.
    """
    bare = name.removeprefix(UNET_PREFIX)
    if known is not None and bare in known:
        return known[bare]
    tokens = bare.split("_")
    parts: list[str] = []
    i = 0
    while i < len(tokens):
        for atom in ATOMS:
            width = atom.count("_") + 1
            if "_".join(tokens[i : i + width]) == atom:
                parts.append(atom)
                i += width
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(p for p in parts if p)


def known_names(modules: Iterable[str]) -> dict[str, str]:
    """Underscore name -> module path for the model's module paths (for exact kohya lookups)."""
    return {m.replace(".", "_"): m for m in modules}


def parse_keys(keys: Iterable[str], known: Mapping[str, str] | None = None) -> KeyMap:
    """Group kohya keys by diffusers module path; text-encoder keys go to ``ignored``."""
    found = KeyMap(style="kohya")
    for key in keys:
        if key.startswith(TEXT_PREFIXES):
            found.ignored.append(key)
            continue
        name, _, suffix = key.partition(".")
        if not name.startswith(UNET_PREFIX) or not suffix:
            found.unknown.append(key)
            continue
        role = _ROLE.get(suffix)
        if role is None:
            feature = next((what for pattern, what in _UNSUPPORTED if pattern.search(suffix)), None)
            if feature is not None:
                found.unsupported[key] = feature
            else:
                found.unknown.append(key)
            continue
        found.put(kohya_to_module(name, known), role, key)
    return found
