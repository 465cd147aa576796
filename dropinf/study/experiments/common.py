"""What the experiment modules share: named random streams, torch's CPU thread count, and the
profile and validation helpers of their ``Config`` dataclasses."""

from __future__ import annotations

import dataclasses
import sys
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TypeVar

import numpy as np
import torch

C = TypeVar("C")


def rng_for(seed: int, *keys: object) -> np.random.Generator:
    """The generator of one named random choice: the same (seed, keys) give the same stream."""
    return np.random.default_rng([seed, *(zlib.crc32(str(k).encode()) for k in keys)])


def seed_for(seed: int, *keys: object) -> int:
    """An integer seed (for torch and the compressors) for one named random choice."""
    return int(rng_for(seed, *keys).integers(2**31 - 1))


@contextmanager
def threads(n: int) -> Iterator[None]:
    """torch's intra-op CPU threads set to n (0: leave as is) inside the block, restored after.

    One thread suits the studies' small models: extra threads only add synchronisation, a
    multi-threaded operation waits for its slowest thread on a machine shared with other
    processes, and results then do not depend on the core count.
    """
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Profiled:
    """Base of the experiments' frozen ``Config`` dataclasses: :meth:`for_profile` builds one
    from the ``PROFILES`` of the module that defines it (profile name -> field values that
    differ from the defaults), so each field is defined once, in the dataclass."""

    @classmethod
    def for_profile(cls, profile: str, **overrides):
        """The profile's configuration with ``overrides`` (field values) applied."""
        return from_profile(cls, vars(sys.modules[cls.__module__])["PROFILES"], profile,
                            overrides)


def from_profile(cls: type[C], profiles: dict[str, dict], profile: str, overrides: dict) -> C:
    """``cls`` (a dataclass) built from ``profiles[profile]`` with ``overrides`` applied as given
    (None is a value, e.g. "all"); unknown profiles and field names raise, naming the choices."""
    if profile not in profiles:
        raise ValueError(f"profile={profile!r} is not one of {sorted(profiles)}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown Config field(s) {unknown}; the fields are {sorted(names)}")
    return cls(**{**profiles[profile], **overrides})


def check_names(cfg: object, name: str, allowed: Sequence[str], empty: bool = False
          ) -> tuple[str, ...]:
    """The field ``name`` of the frozen dataclass ``cfg`` as a tuple of distinct entries of
    ``allowed`` (one string is one entry; papermill passes lists), set on ``cfg`` and returned;
    a ValueError naming the field, the value and the choices otherwise. ``empty``: allow ()."""
    value = getattr(cfg, name)
    value = (value,) if isinstance(value, str) else value
    if (not isinstance(value, (tuple, list)) or any(v not in allowed for v in value)
            or len(set(value)) != len(value) or not (value or empty)):
        raise ValueError(f"{name}={value!r}: choose distinct names from {tuple(allowed)}"
                         + ("" if empty else " (at least one)"))
    object.__setattr__(cfg, name, tuple(value))
    return tuple(value)


def float_list(name: str, value) -> tuple[float, ...]:
    """A number or a list of numbers (papermill passes JSON lists) as a non-empty tuple of
    floats; ValueError naming the field ``name`` otherwise."""
    if isinstance(value, (int, float)):
        value = (value,)
    try:
        if isinstance(value, str):
            raise TypeError
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={value!r} must be a list of numbers") from None
    if not out:
        raise ValueError(f"{name} is empty; give at least one value")
    return out


def check_int(cfg: object, name: str, low: int) -> None:
    """Raise ValueError unless the field ``name`` of ``cfg`` is an integer (not a bool) >= low."""
    value = getattr(cfg, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r} must be an integer >= {low}")


def check_device(device: str | None) -> None:
    """Raise ValueError, before any work, when ``device`` asks for CUDA and torch sees none
    (``None``: the caller picks the device itself)."""
    if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"device={device!r} but no CUDA device is available (torch.cuda.is_available() is "
            "False); run on the CPU with `-p device cpu` (config={'device': 'cpu'}), or run the "
            "gpu-smoke profile to exercise the gpu profile's code at toy size"
        )
