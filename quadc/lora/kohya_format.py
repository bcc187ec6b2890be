"""kohya-ss / A1111 / LyCORIS-LoCon LoRA key names.

A kohya key is ``<name>.<suffix>`` where ``name`` is ``lora_unet_`` plus the diffusers module path with
every ``.`` replaced by ``_`` (sd-scripts does exactly that for SD1.x, which it trains on the diffusers
U-Net), e.g. ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0``, and ``suffix``
is ``lora_down.weight`` (down, ``[r, d_in]`` or ``[r, d_in, kh, kw]``), ``lora_up.weight`` (up,
``[d_out, r]`` or ``[d_out, r, 1, 1]``) or ``alpha`` (scalar; scale = alpha / rank; missing means
alpha = rank). Text-encoder names start with ``lora_te_``/``lora_te1_``/``lora_te2_`` and are ignored.
Some files name the layers after the original Stable Diffusion U-Net instead
(``lora_unet_input_blocks_1_1_proj_in``, ``..._output_blocks_5_2_conv``); with the model known, those
names are looked up too (:func:`ldm_names`).

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
    """Underscore name -> module path for the model's module paths (for exact kohya lookups), with the
    original Stable Diffusion (LDM) names of the same layers as aliases (:func:`ldm_names`)."""
    modules = list(modules)
    known = {ldm.replace(".", "_"): m for m, ldm in ldm_names(modules).items()}
    known.update({m.replace(".", "_"): m for m in modules})
    return known


#: Sub-layers of a diffusers ResnetBlock2D under their LDM ResBlock names.
_LDM_RESNET = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
               "conv_shortcut": "skip_connection"}


def ldm_names(modules: Iterable[str]) -> dict[str, str]:
    """diffusers module path -> the same layer's path in the original Stable Diffusion U-Net (LDM/SGM:
    ``input_blocks``, ``middle_block``, ``output_blocks``), which some kohya files use
    (``lora_unet_input_blocks_1_1_proj_in``) and diffusers' own loader maps too.

    The block numbers follow from the model: ``input_blocks.0`` is ``conv_in``, each down level ``l`` has
    ``layers_per_block`` (resnet ``.0``, attention ``.1``) blocks from ``1 + l * (layers_per_block + 1)``
    and then its downsampler (``.0.op``); ``middle_block.0/1/2`` are resnet, attention, resnet; each up
    level has ``layers_per_block + 1`` blocks, its upsampler the last one's ``.1.conv`` (``.2.conv`` after
    an attention). Attention layers keep their names inside their block. A path outside this layout has
    no LDM name.
    """
    modules = list(modules)
    firsts = [int(m.split(".")[3]) for m in modules if m.startswith("down_blocks.0.resnets.")]
    if not firsts:
        return {}
    per = max(firsts) + 1  # layers_per_block
    attended = {m.split(".")[1] for m in modules if m.startswith("up_blocks.") and ".attentions." in m}
    fixed = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
             "time_embedding.linear_2": "time_embed.2"}
    names: dict[str, str] = {}
    for module in modules:
        if module in fixed:
            names[module] = fixed[module]
            continue
        parts = module.split(".")
        if parts[0] == "mid_block":  # one level without a number: resnet, attention, resnet
            parts.insert(1, "0")
        if len(parts) < 5 or not parts[1].isdigit() or not parts[3].isdigit():
            continue
        top, level, kind, index, rest = parts[0], int(parts[1]), parts[2], int(parts[3]), parts[4:]
        if kind == "resnets":
            if len(rest) != 1 or rest[0] not in _LDM_RESNET:
                continue
            inner = ["0", *_LDM_RESNET[rest[0]].split(".")]
        elif kind == "attentions":
            inner = ["1", *rest]
        elif kind in ("downsamplers", "upsamplers") and rest == ["conv"] and index == 0:
            inner = ["0", "op"] if kind == "downsamplers" else ["2" if parts[1] in attended else "1", "conv"]
        else:
            continue
        if top == "down_blocks" and kind != "upsamplers":
            block = (level + 1) * (per + 1) if kind == "downsamplers" else 1 + level * (per + 1) + index
            names[module] = ".".join(["input_blocks", str(block), *inner])
        elif top == "up_blocks" and kind != "downsamplers":
            block = level * (per + 1) + (per if kind == "upsamplers" else index)
            names[module] = ".".join(["output_blocks", str(block), *inner])
        elif top == "mid_block" and (kind, index) in (("resnets", 0), ("attentions", 0), ("resnets", 1)):
            block = 2 * index if kind == "resnets" else 1  # a middle block has no sub-index
            names[module] = ".".join(["middle_block", str(block), *inner[1:]])
    return names


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
