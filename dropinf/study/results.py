"""Where a notebook's results go, and the manifest that says how they were made.

Layout of one notebook's results (``results/<profile>/<notebook>/``)::

    <notebook>.ipynb    the executed notebook (written by the pipeline)
    figures/NAME.png    and NAME.pdf
    tables/NAME.csv
    summary.json        the numbers the notebook reports (deterministic for a fixed seed)
    manifest.json       provenance: git commit and dirty flag, package versions, profile,
                        parameters, seeds, hardware, wall time

``summary.json`` holds only results, so two runs with the same seed give the same file;
everything that varies between runs (times, host, commit) goes to ``manifest.json``.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from .._io import atomic_write, write_json

PROFILES = ("cpu-quick", "gpu", "gpu-smoke")
PACKAGES = ("dropinf", "torch", "numpy", "scipy", "scikit-learn", "pandas", "matplotlib",
            "transformers", "papermill", "mnist1d")


def repo_root() -> Path:
    """The checkout this package lives in (where ``pyproject.toml`` is), else the working dir."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "pyproject.toml").exists() else Path.cwd()


# What a run writes: changes there do not make the code that produced it differ from the commit.
GENERATED = ("results", "paper/paper.md", "paper/paper.pdf", "paper/figures")


def git_state(root: Path | None = None) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the checkout at ``root``. "dirty"
    counts changes to tracked files other than the study's outputs (:data:`GENERATED`), so a
    run's own results, swapped in notebook by notebook, do not mark the next notebook dirty."""
    root = root or repo_root()

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git(
        "status", "--porcelain", "--untracked-files=no", "--", ".",
        *(f":(exclude){p}" for p in GENERATED),
    )
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def hardware() -> dict[str, Any]:
    """CPU model and core count, torch threads, GPU model(s) if CUDA is available."""
    cpu = platform.processor() or None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"machine": platform.machine(), "system": platform.system(),
                            "cpu": cpu, "cpu_count": os.cpu_count()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        info["gpus"] = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
                        if torch.cuda.is_available() else [])
    except ImportError:
        pass
    return info


def portable(value: Any, root: str | os.PathLike | None = None) -> Any:
    """``value`` with every path in it written relative to ``root`` (default: the repository).

    A path is an ``os.PathLike`` or a string that is an absolute path; one outside ``root``
    gets ``../`` parts. Mappings, lists and tuples are walked; anything else is returned as is.
    So what the study records names no machine's directories.
    """
    if isinstance(value, dict):
        return {k: portable(v, root) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [portable(v, root) for v in value]
    if isinstance(value, os.PathLike) or (isinstance(value, str) and os.path.isabs(value)):
        base = os.path.realpath(root if root is not None else repo_root())
        return Path(os.path.relpath(os.path.realpath(value), base)).as_posix()
    return value


def manifest(profile: str, params: dict[str, Any], seeds: dict[str, Any] | None = None,
             **extra: Any) -> dict[str, Any]:
    """Provenance of one result: code version, environment, profile, parameters, seeds, hardware.

    Paths in ``params`` and ``extra`` are recorded relative to the repository (:func:`portable`).
    """
    return {"git": git_state(), "packages": package_versions(), "profile": profile,
            "params": portable(params), "seeds": seeds or {}, "hardware": hardware(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **portable(extra)}


def _as_dict(params: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        return dataclasses.asdict(params)
    return dict(params)


class Run:
    """One notebook's results directory: figures, tables, a summary and a manifest.

    ``Run("01_theory", profile, params)`` writes under ``results/<profile>/01_theory/`` of the
    checkout, or under ``out_dir`` when given (the pipeline passes it). ``params`` is a dict or
    a dataclass (saved as is in the manifest); ``seeds`` names every seed the notebook uses.
    """

    def __init__(self, name: str, profile: str, params: Any = None, *,
                 seeds: dict[str, Any] | None = None, out_dir: str | os.PathLike | None = None):
        if profile not in PROFILES:
            raise ValueError(f"profile={profile!r} is not one of {PROFILES}")
        self.name, self.profile = name, profile
        self.params = _as_dict(params or {})
        self.seeds = dict(seeds or {})
        self.dir = Path(out_dir) if out_dir else repo_root() / "results" / profile / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self._t0 = time.perf_counter()
        self.figures: list[str] = []
        self.tables: list[str] = []

    def figure(self, fig, name: str, **savefig_kw: Any) -> Path:
        """Save a matplotlib figure as ``figures/NAME.png`` (150 dpi) and ``NAME.pdf``."""
        out = self.dir / "figures"
        for ext, kw in (("png", {"dpi": 150}), ("pdf", {})):
            # No creation date, so the files depend only on the figure.
            meta = {"CreationDate": None} if ext == "pdf" else {"Software": None}
            atomic_write(out / f"{name}.{ext}", lambda f, ext=ext, kw=kw, meta=meta: fig.savefig(
                f, format=ext, bbox_inches="tight", metadata=meta, **kw, **savefig_kw))
        self.figures.append(name)
        return out / f"{name}.png"

    def table(self, df, name: str) -> Path:
        """Save a DataFrame as ``tables/NAME.csv`` (floats to 6 significant digits)."""
        text = df.to_csv(index=False, float_format="%.6g")
        self.tables.append(name)
        return atomic_write(self.dir / "tables" / f"{name}.csv", lambda f: f.write(text), mode="w")

    def finish(self, summary: dict[str, Any]) -> dict[str, Any]:
        """Write ``summary.json`` (the results) and ``manifest.json`` (their provenance)."""
        write_json(self.dir / "summary.json", {"notebook": self.name, "profile": self.profile,
                                               **summary})
        m = manifest(self.profile, self.params, self.seeds, notebook=self.name,
                     wall_s=round(time.perf_counter() - self._t0, 3),
                     figures=sorted(self.figures), tables=sorted(self.tables))
        write_json(self.dir / "manifest.json", m)
        return summary
