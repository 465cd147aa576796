"""Gradient compressors: one interface, a registry by name.

A compressor maps per-sample gradients in R^d to R^k with one fixed random draw shared by every
sample, so compressed inner products are comparable across samples. It is fully determined by
its constructor arguments (kind, size, seed), which form its ``fingerprint``.

Life cycle: ``bind(params)`` once with the task's parameter layout (this is where masks or
projections are drawn), then ``compress(bg)`` per batch of :class:`~dropinf.persample.BatchGrads`,
returning ``(B, dim)``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from typing import ClassVar

from torch import Tensor

from .persample import BatchGrads
from .task import ParamInfo

REGISTRY: dict[str, type[Compressor]] = {}


class Compressor(ABC):
    """Base class. Subclasses set ``kind`` and are registered under it."""

    kind: ClassVar[str]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            REGISTRY[cls.kind] = cls

    def __init__(self) -> None:
        self.params: list[ParamInfo] | None = None

    def bind(self, params: list[ParamInfo]) -> Compressor:
        """Fix the input layout (the task's selected parameters). Returns self."""
        if self.params is not None and self.params != params:
            raise ValueError(
                f"{self!r} is already bound to a different parameter layout; create a new "
                "compressor (same arguments give the same draw) for another model"
            )
        self.params = params
        return self

    @property
    def input_dim(self) -> int:
        if self.params is None:
            raise RuntimeError(f"{self!r} is not bound to a model yet; call bind(task.params)")
        return self.params[-1].stop

    @property
    @abstractmethod
    def dim(self) -> int:
        """Output size k."""

    @property
    def map_bytes(self) -> int:
        """Bytes of the stored compression map (0 when it is regenerated from a seed)."""
        return 0

    @abstractmethod
    def config(self) -> dict:
        """Constructor arguments: with ``kind``, they determine the compressor completely."""

    @property
    def fingerprint(self) -> str:
        """Deterministic description saved beside results."""
        return json.dumps({"kind": self.kind, **self.config()}, sort_keys=True)

    @abstractmethod
    def compress(self, bg: BatchGrads) -> Tensor:
        """(B, dim) compressed per-sample gradients of one batch."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class Identity(Compressor):
    """No compression: the full per-sample gradient, ``dim == d``."""

    kind = "identity"

    @property
    def dim(self) -> int:
        return self.input_dim

    def config(self) -> dict:
        return {}

    def compress(self, bg: BatchGrads) -> Tensor:
        return bg.flat()


def make(kind: str, **kwargs) -> Compressor:
    """Build a compressor from its registry name, e.g. ``make("identity")``."""
    if kind not in REGISTRY:
        raise ValueError(f"unknown compressor kind {kind!r}; choose one of {sorted(REGISTRY)}")
    return REGISTRY[kind](**kwargs)
