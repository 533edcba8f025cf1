"""One option's record and the checks on one value: ``OptionInfo``, ``parse_value`` (a string
from a form, a flag, TOML or JSON to the typed value) and ``check_value`` (type and bounds).

The options themselves are TrainConfig's fields (``worker.engine.config``), declared with
``opt(...)``; ``config.options()`` lists them. Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

INT64_MAX = 2**63 - 1
TRUE_WORDS = ("1", "true", "on", "yes")
FALSE_WORDS = ("0", "false", "off", "no")


def opt(default: Any, *, label: str, help: str | Callable[[], str], group: str,
        unit: str | None = None, choices: tuple[str, ...] | Callable[[], tuple[str, ...]] = (),
        kind: str | None = None, min: float | None = None, max: float | None = None,
        min_exclusive: bool = False, max_exclusive: bool = False, advanced: bool = True,
        in_form: bool = True) -> Any:
    """A TrainConfig field with its option metadata (see ``OptionInfo``). ``help`` and
    ``choices`` may be functions, called by ``config.options()`` (the registry's types and their
    learning-rate bases are read when asked, so a type registered later shows up)."""
    meta = dict(label=label, help=help, group=group, unit=unit, choices=choices, kind=kind,
                min=min, max=max, min_exclusive=min_exclusive, max_exclusive=max_exclusive,
                advanced=advanced, in_form=in_form)
    return field(default=default, metadata={"option": meta})


@dataclass(frozen=True)
class OptionInfo:
    """What the CLI, the web form, the JSON API and the README know about one option."""

    name: str
    """The TrainConfig field (and JSON key); the flag is ``--`` + name with ``-`` for ``_``."""
    label: str
    help: str
    """Full sentences: what the option does and what blank means."""
    kind: str
    """"int", "float", "bool", "str" (free text) or "choice" (one of ``choices``)."""
    default: Any
    unit: str | None
    choices: tuple[str, ...]
    """The allowed values of a "choice"; common values of a "str" (device: cuda:1 is valid)."""
    min: float | None
    max: float | None
    optional: bool
    """None is allowed: blank = automatic (the help says what it becomes)."""
    advanced: bool
    """Under "Advanced" in the form."""
    in_form: bool
    """False for the data-source options the web takes from the chosen model and dataset."""
    applies_to: tuple[str, ...] | None
    """The encoder types that use it; None = every type."""
    group: str
    min_exclusive: bool = False
    max_exclusive: bool = False

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _number(value: float) -> str:
    return f"{value:,}" if isinstance(value, int) else f"{value:g}"


def range_text(info: OptionInfo) -> str:
    """The allowed range in words ("between 0 and 1", "at least 1", "greater than 0"), or ""."""
    lo = hi = ""
    if info.min is not None:
        lo = f"{'greater than' if info.min_exclusive else 'at least'} {_number(info.min)}"
    if info.max is not None and info.max != INT64_MAX:
        hi = f"{'less than' if info.max_exclusive else 'at most'} {_number(info.max)}"
    if lo and hi and not (info.min_exclusive or info.max_exclusive):
        return f"between {_number(info.min)} and {_number(info.max)}"
    return " and ".join(p for p in (lo, hi) if p)


def check_value(info: OptionInfo, value: Any) -> str | None:
    """Why ``value`` (already typed) is not valid for the option, or None when it is."""
    if value is None:
        return None if info.optional else f"{info.label} needs a value."
    if info.kind == "bool":
        return None if isinstance(value, bool) else f"{info.label} must be on or off."
    if info.kind in ("str", "choice"):
        if not isinstance(value, str):
            return f"{info.label} must be text (got {value!r})."
        if info.kind == "choice" and value not in info.choices:
            return (f"{info.label} '{value}' is not available; choose one of "
                    f"{', '.join(info.choices)}.")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or (
            info.kind == "int" and not isinstance(value, int)):
        what = "a whole number" if info.kind == "int" else "a number"
        return f"{info.label} must be {what} (got {value!r})."
    if isinstance(value, float) and not math.isfinite(value):  # an int of any size is finite
        return f"{info.label} must be a finite number (got {value})."
    too_low = info.min is not None and (value <= info.min if info.min_exclusive
                                        else value < info.min)
    too_high = info.max is not None and (value >= info.max if info.max_exclusive
                                         else value > info.max)
    unbounded = info.max in (None, INT64_MAX)
    if too_high and info.max == INT64_MAX:
        return f"{info.label} must fit in 64 bits (at most {INT64_MAX:,}; got {value:,})."
    if too_low and info.min == 0 and not info.min_exclusive and unbounded:
        return f"{info.label} must not be negative (got {_number(value)})."
    if too_low or too_high:
        return f"{info.label} must be {range_text(info)} (got {_number(value)})."
    return None


def parse_value(info: OptionInfo, raw: Any) -> Any:
    """A value from a form, a flag, TOML or JSON (string or typed) as the option's type.

    Ints accept "4_096", "4,096" and "1e3" (when whole); booleans 1/true/on/yes and
    0/false/off/no; NaN and infinities are refused; blank is None for an optional option.
    Raises ValueError with a sentence naming the label. Bounds are ``check_value``'s job.
    """
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        if info.optional:
            return None
        raise ValueError(f"{info.label} needs a value.")
    text = raw.strip() if isinstance(raw, str) else raw
    if info.kind == "bool":
        if isinstance(raw, bool):
            return raw
        word = str(text).lower()
        if word in TRUE_WORDS or word in FALSE_WORDS:
            return word in TRUE_WORDS
        raise ValueError(f"{info.label} must be on or off (got '{raw}').")
    if info.kind in ("str", "choice"):
        value = str(text)
        if info.kind == "choice" and value not in info.choices:
            raise ValueError(f"{info.label} '{value}' is not available; choose one of "
                             f"{', '.join(info.choices)}.")
        return value
    if isinstance(raw, bool):
        raise ValueError(f"{info.label} must be a number (got '{raw}').")
    if info.kind == "int":
        if isinstance(raw, int):
            return raw
        if isinstance(raw, str):
            text = text.replace("_", "").replace(",", "")
            try:
                return int(text)
            except ValueError:
                pass
        try:
            number = float(text)
        except (TypeError, ValueError):
            raise ValueError(f"{info.label} must be a whole number (got '{raw}').") from None
        if not number.is_integer():  # also NaN and infinities
            raise ValueError(f"{info.label} must be a whole number (got '{raw}').")
        return int(number)
    try:
        number = float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{info.label} must be a number (got '{raw}').") from None
    if not math.isfinite(number):
        raise ValueError(f"{info.label} must be a finite number (got '{raw}').")
    return number
