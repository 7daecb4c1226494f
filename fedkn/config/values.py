"""Typing and range checks shared by every sub-config, and :class:`Section`, their base.

A user types flat kebab-case keys (``lr``, ``dp-noise-multiplier``); each key is one field of one
sub-config. A :class:`Section` knows the key of each of its fields (``PREFIX`` plus the field name,
or the field's ``metadata["key"]``), so every message names the key the user typed.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import Field, dataclass, fields
from typing import Any, ClassVar

from fedkn.errors import FedknError

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _integer(value: Any) -> int:
    """An int, a whole float, or a string of an int (not of a float: "1.5" and "1.0" are rejected)."""
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(value)
        return int(value)
    if isinstance(value, (int, str)):
        return int(value)
    raise TypeError(value)


def coerce(kind: str, key: str, value: Any) -> Any:
    """``value`` as a field of type ``kind`` ("bool", "int", "float", "str"); strings (from
    ``--set``) are parsed. Raises a one-line :class:`FedknError` naming ``key``."""
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise FedknError(f"config key '{key}' must be true or false, got {value!r}")
    if kind in ("int", "float"):
        what = "an integer" if kind == "int" else "a number"
        number: int | float | None = None
        if not isinstance(value, bool):  # a bool is an int to Python, never to a config
            with contextlib.suppress(ValueError, TypeError):
                number = _integer(value) if kind == "int" else float(value)
        if number is None:
            raise FedknError(f"config key '{key}' must be {what}, got {value!r}")
        if not math.isfinite(number):
            raise FedknError(f"config key '{key}' must be a finite number, got {value!r}")
        return number
    if kind == "str":
        if isinstance(value, str):
            return value
        raise FedknError(f"config key '{key}' must be a string, got {value!r}")
    raise AssertionError(f"unhandled field type {kind} for {key}")  # pragma: no cover


def check(ok: bool, key: str, what: str, value: Any) -> None:
    """The one shape of a range error: ``config key 'k' must be <what>, got <value>``."""
    if not ok:
        raise FedknError(f"config key '{key}' must be {what}, got {value!r}")


@dataclass(frozen=True)
class Section:
    """Base of the frozen sub-configs: types each field on construction, then :meth:`validate`.

    Subclasses are ``@dataclass(frozen=True)``; they check their own fields only. Rules that span
    sub-configs live in :mod:`fedkn.config.run` (``cross_checks``).
    """

    #: Prefix of the flat keys of this section's fields (``dp-`` for ``dp-delta``).
    PREFIX: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, coerce(str(f.type), self.key_of(f), getattr(self, f.name)))
        self.validate()

    @classmethod
    def key_of(cls, f: Field[Any]) -> str:
        """The flat kebab-case key a user types for field ``f``."""
        return f.metadata.get("key") or cls.PREFIX + f.name.replace("_", "-")

    def key(self, name: str) -> str:
        """The flat key of the field called ``name``."""
        return self.key_of(next(f for f in fields(self) if f.name == name))

    def check(self, name: str, ok: bool, what: str) -> None:
        """Range check of field ``name``: one line naming its flat key and value when not ``ok``."""
        check(ok, self.key(name), what, getattr(self, name))

    def validate(self) -> None:
        """Check this section's own values (overridden by each section)."""
