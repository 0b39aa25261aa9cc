"""What every backbone provides to generators and to the runner."""

from __future__ import annotations

import abc
from typing import Any


class Backbone(abc.ABC):
    """A family of weights plus the prompts it understands.

    Attributes:
        name: Backbone spec as written (``"digits"``, ``"diffusers:./models/sd15"``).
        kind: Registry name (``"digits"``, ``"diffusers"``); generator factories dispatch on it.
    """

    name: str
    kind: str

    @abc.abstractmethod
    def check_prompt(self, prompt: str) -> None:
        """Raise :class:`harness.errors.PromptError` (listing accepted forms) for a bad prompt."""

    @abc.abstractmethod
    def default_prompts(self, n: int) -> list[str]:
        """``n`` prompts for a benchmark run, spread evenly over what the backbone can draw."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Facts for the report: data source, image size, hash of the data."""
