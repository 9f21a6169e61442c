"""The base of every config section: typed, frozen, unknown keys refused, booleans never read as numbers.

djc/config.py assembles the tree; each method's own section is defined beside the method (djc/methods/) on the
same base, so that adding a method never touches the config module.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _numeric(annotation: Any) -> bool:
    """Whether a field takes numbers and not booleans (int, float, float | "auto", list[float] | float, ...)."""
    args = typing.get_args(annotation)
    if args:
        return bool not in args and any(_numeric(a) for a in args)
    return annotation in (int, float)


class Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1 for an int field: `optim.epochs=true` would train one epoch.
        if isinstance(value, bool) and _numeric(cls.model_fields[info.field_name].annotation):
            raise ValueError("expected a number, got a boolean")
        return value
