"""The one options parser: declared options (name, type, default, help) and the one boolean parser.

Passes declare their options as :class:`PassOption` s (``quadc.passes.base.GraphPass.options``); the
quantization planner's options are the ``quant-plan`` pass's. Values come from the CLI, from
``PassPipeline.set_options`` or from Python, as typed values or strings, and are parsed here once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from quadc.errors import QuadcError

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def parse_bool(value: Any, where: str) -> bool:
    """The one boolean parser: ``True``/``False`` or the strings true/false, yes/no, on/off, 1/0."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str):
        v = value.strip().lower()
        if v in _TRUE:
            return True
        if v in _FALSE:
            return False
    raise QuadcError(f"{where}={value!r} is not a boolean; use true or false")


@dataclass(frozen=True)
class PassOption:
    """One option a pass declares. ``type`` is ``bool``, ``int``, ``float`` or ``str``; ``choices``
    limits a ``str``; ``low``/``high`` bound a number (inclusive). ``default=None`` means "not set"."""

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None

    def parse(self, value: Any, where: str) -> Any:
        """``value`` converted to the option's type and checked, or a one-line QuadcError."""
        where = f"{where}.{self.name}"
        if value is None:
            return None
        if self.type is bool:
            return parse_bool(value, where)
        if self.type is str:
            text = str(value).strip()
            if self.choices and text.lower() not in self.choices:
                raise QuadcError(f"{where}={value!r} is not one of {', '.join(self.choices)}")
            return text.lower() if self.choices else text
        try:
            if isinstance(value, bool):
                raise ValueError
            num = self.type(value)
            if self.type is int and float(value) != num:
                raise ValueError
        except (TypeError, ValueError):
            kind = "an integer" if self.type is int else "a number"
            raise QuadcError(f"{where}={value!r} is not {kind}") from None
        if isinstance(num, float) and not math.isfinite(num):
            raise QuadcError(f"{where}={value!r} must be finite")
        if (self.low is not None and num < self.low) or (self.high is not None and num > self.high):
            bounds = f"[{self.low}, {self.high}]" if self.high is not None else f">= {self.low}"
            raise QuadcError(f"{where}={value!r} is out of range; use a value in {bounds}")
        return num

    def describe(self) -> str:
        """``name (type, default X): help`` for `quadc passes`."""
        kind = "|".join(self.choices) if self.choices else self.type.__name__
        return f"{self.name} ({kind}, default {self.default}): {self.help}"


def parse_options(declared: tuple[PassOption, ...], values: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """Every declared option of ``owner``: the given value parsed and checked, else its default. Unknown
    names are a one-line error; names may be written with ``-`` or ``_``."""
    by_name = {o.name: o for o in declared}
    out = {o.name: o.default for o in declared}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in by_name:
            known = ", ".join(by_name) or "none"
            raise QuadcError(f"'{owner}' has no option '{key}'; its options: {known}")
        parsed = by_name[name].parse(value, owner)
        out[name] = by_name[name].default if parsed is None else parsed
    return out
