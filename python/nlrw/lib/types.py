"""Vocabulary types shared by the configs and the models (plain ``Literal`` aliases)."""

from __future__ import annotations

from typing import Literal

__all__ = ["DTypeOption", "Kind"]

Kind = Literal["transcoder", "sae"]
"""What is captured at a hookpoint: the module's input and output (``"transcoder"``) or its
output alone (``"sae"``)."""

DTypeOption = Literal["auto", "float32", "bfloat16", "float16"]
"""Precision of the subject: ``"auto"`` is float32 on the CPU and bfloat16 on a GPU."""
