"""Shared pieces of the config models."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from pydantic_core import PydanticCustomError


def one_of(value: str, choices) -> str:
    """A value checked against a registry (objectives, ...) rather than a fixed Literal."""
    if value not in choices:
        raise PydanticCustomError("choice", "expected one of {choices}", {"choices": ", ".join(choices)})
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)
