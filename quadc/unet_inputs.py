"""The one rule that says which graph input is the U-Net's ``sample``, ``timestep`` and
``encoder_hidden_states``, and which inputs are LoRA slot inputs.

The frontend (:func:`quadc.frontend.recognize.recognize_unet`) and the calibration feeds
(:func:`quadc.quant.feeds.random_feeds`) both call :func:`unet_input_roles`, so a model the frontend
accepts is a model the feeds can drive, with the same input in the same role.

Each role has its own rank, so the roles never compete for an input:

============================  ======  ======  ==========================================================
role                          rank    dtype   names tried (case-insensitive), exact before substring
============================  ======  ======  ==========================================================
``sample``                    4       float   sample, latent, latents, latent_model_input, x;  *sample*, *latent*
``timestep``                  0 or 1  number  timestep, timesteps, t;  *timestep*, *time*
``encoder_hidden_states``     3       float   encoder_hidden_states, context, text_embeddings, cond, c;
                                              *encoder_hidden*, *hidden_states*, *context*, *text*, *cond*
============================  ======  ======  ==========================================================

For each role, among the inputs of its rank and dtype that are not LoRA slot inputs
(``<module>.lora_down`` / ``<module>.lora_up``; a conv slot's ``lora_down`` is a 4-D float input too):
an exact name wins, else a name containing one of the words (in the order given), else the only
candidate. Both of torch's exporters, as ``quadc export`` drives them, name the inputs exactly
``sample``, ``timestep`` and ``encoder_hidden_states``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from quadc.errors import QuadcError

__all__ = ["LORA_DOWN_SUFFIX", "LORA_INPUT_SUFFIXES", "LORA_UP_SUFFIX", "UNET_ROLES", "is_lora_input",
           "unet_input_roles"]

LORA_DOWN_SUFFIX = ".lora_down"
LORA_UP_SUFFIX = ".lora_up"
LORA_INPUT_SUFFIXES = (LORA_DOWN_SUFFIX, LORA_UP_SUFFIX)
UNET_ROLES = ("sample", "timestep", "encoder_hidden_states")

_RANKS = {"sample": (4,), "timestep": (0, 1), "encoder_hidden_states": (3,)}
_EXACT = {
    "sample": ("sample", "latent", "latents", "latent_model_input", "x"),
    "timestep": ("timestep", "timesteps", "t"),
    "encoder_hidden_states": ("encoder_hidden_states", "context", "text_embeddings", "cond", "c"),
}
_WORDS = {
    "sample": ("sample", "latent"),
    "timestep": ("timestep", "time"),
    "encoder_hidden_states": ("encoder_hidden", "hidden_states", "context", "text", "cond"),
}
_WANT = {"sample": "a 4-D float 'sample'", "timestep": "a 0-D or 1-D 'timestep'",
         "encoder_hidden_states": "a 3-D float 'encoder_hidden_states'"}


def is_lora_input(name: str) -> bool:
    """Whether ``name`` is a LoRA slot input (``<module>.lora_down`` or ``<module>.lora_up``)."""
    return name.endswith(LORA_INPUT_SUFFIXES)


def _dtype(dtype: Any) -> np.dtype | None:
    try:
        return np.dtype(dtype) if dtype is not None else None
    except TypeError:
        return None


def _entries(inputs: Any) -> list[tuple[str, tuple[Any, ...] | None, np.dtype | None]]:
    """(name, shape or None, dtype or None) of a gs.Graph's inputs, gs tensors, or ``{name: (shape, dtype)}``."""
    if isinstance(inputs, Mapping):
        return [(str(n), tuple(shape) if shape is not None else None, _dtype(dt)) for n, (shape, dt) in inputs.items()]
    tensors = getattr(inputs, "inputs", inputs)
    return [(t.name, tuple(t.shape) if t.shape is not None else None, _dtype(t.dtype)) for t in tensors]


def _fits(role: str, shape: Sequence[Any] | None, dtype: np.dtype | None) -> bool:
    if shape is None or dtype is None or len(shape) not in _RANKS[role]:
        return False
    if role == "timestep":
        return bool(np.issubdtype(dtype, np.number))
    return bool(np.issubdtype(dtype, np.floating))


def _pick(role: str, names: list[str]) -> str | None:
    lowered = {n: n.lower() for n in names}
    for exact in _EXACT[role]:
        hit = next((n for n in names if lowered[n] == exact), None)
        if hit is not None:
            return hit
    for word in _WORDS[role]:
        hit = next((n for n in names if word in lowered[n]), None)
        if hit is not None:
            return hit
    return names[0] if len(names) == 1 else None


def _describe(entries: list[tuple[str, tuple[Any, ...] | None, np.dtype | None]]) -> str:
    if not entries:
        return "no inputs"
    return ", ".join(f"{n} {dt.name if dt is not None else 'unknown'}{list(s) if s is not None else '[?]'}"
                     for n, s, dt in entries)


def unet_input_roles(inputs: Any, where: str = "model") -> dict[str, str]:
    """``{"sample": name, "timestep": name, "encoder_hidden_states": name}`` for a gs.Graph, its input
    tensors or ``{name: (shape, dtype)}`` specs, by the rule in the module docstring; a one-line QuadcError
    (prefixed with ``where``) when a role has no candidate or several that no name tells apart."""
    entries = _entries(inputs)
    unet = [e for e in entries if not is_lora_input(e[0])]
    roles: dict[str, str] = {}
    missing: list[str] = []
    ambiguous: list[str] = []
    for role in UNET_ROLES:
        names = [n for n, shape, dtype in unet if _fits(role, shape, dtype)]
        hit = _pick(role, names)
        if hit is not None:
            roles[role] = hit
        elif names:
            ambiguous.append(f"{role} (one of {', '.join(names)})")
        else:
            missing.append(_WANT[role])
    if missing:
        raise QuadcError(f"{where}: not a U-Net graph: it lacks {', '.join(missing)} input "
                         f"(found {_describe(entries)}); export it with 'quadc export'")
    if ambiguous:
        raise QuadcError(f"{where}: cannot tell which input is the U-Net's {'; '.join(ambiguous)}; name them "
                         "sample, timestep and encoder_hidden_states as diffusers exports do")
    return roles
