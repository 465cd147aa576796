"""Run the study's notebooks with papermill, then assemble the paper from their results.

``python -m dropinf run`` (what ``./reproduce.sh`` calls) executes ``notebooks/NN_*.ipynb`` in
name order with papermill. Each notebook's ``parameters`` cell holds ``profile``, ``out_dir`` and
``config`` (a dict of overrides of its experiment's ``Config``, the class named by the notebook's
``metadata.dropinf.config``); the runner injects all three. A ``-p KEY VALUE`` override goes into
``config`` of every selected notebook whose Config has the field ``KEY``; one that no selected
Config has is refused naming their fields, and each Config is built with its overrides before
anything runs, so a bad value is refused up front (:func:`check_overrides`). Where the results
go (:func:`output_dir`):

- no overrides: ``results/<profile>/<stem>/`` (layout in :mod:`dropinf.study.results`), the
  committed study for cpu-quick;
- with ``-p``/``-y`` overrides: ``results/<profile>+<hash>/`` (:func:`overrides_hash`; git
  ignores it), so that trying a parameter never touches the committed results;
- ``--into DIR``: ``DIR/<stem>/``, on purpose (``--into results/cpu-quick`` replaces the
  committed results notebook by notebook).

Each notebook runs into a fresh hidden directory beside its results and replaces them only when
it ran to the end (:func:`swap_in`); a failed or interrupted run keeps the previous results as
they were and leaves its own copy in ``<stem>.failed/``. A notebook that fails does not stop the
others; the run ends with a table of notebooks, status and wall time, writes ``run.json`` beside
the results (paths in it relative to the repository root) and exits non-zero if any failed.

``python -m dropinf paper`` renders ``paper/paper.template.md`` into ``paper/paper.md`` from
``results/<profile>/`` only (placeholder grammar in :func:`render_template`). The run does this
last when it wrote ``results/<profile>/`` without overrides (``--paper`` to do it with them,
``--no-paper`` never).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import hashlib
import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .._io import atomic_write, fsync_dir, write_json
from .results import PROFILES, manifest, portable, repo_root

NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
DEFAULT_PROFILE = "cpu-quick"
DEFAULT_KERNEL = "dropinf"
INJECTED = ("profile", "out_dir", "config")  # the parameters cell; set by the runner, not -p
STEM_RE = re.compile(r"\d\d_\w+")  # a notebook's results directory (not .failed, not hidden)

Log = Callable[[str], None]


def _log(msg: str) -> None:
    print(msg, flush=True)


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def _rel(path: Path) -> str:
    """``path`` relative to the working directory when it lies under it (shorter to read)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise ValueError(f"profile={profile!r} is not a profile; use one of {', '.join(PROFILES)}")
    return profile


# --------------------------------------------------------------------------- notebooks


def find_notebooks(notebooks_dir: str | Path | None = None) -> list[Path]:
    """The study's notebooks ``NN_*.ipynb`` in ``notebooks_dir`` (default notebooks/), sorted."""
    d = Path(notebooks_dir) if notebooks_dir else repo_root() / "notebooks"
    return sorted(d.glob(NOTEBOOK_GLOB))


def select(notebooks: Sequence[Path], only: Sequence[str] | None) -> list[Path]:
    """The notebooks named by ``only`` (stems or stem prefixes: ``01``, ``01_theory``), in order.

    ``None`` or empty selects all. Entries may also be file names (``01_theory.ipynb``). An empty
    name (``--only ,``) or one matching no notebook is a ValueError listing the notebooks.
    """
    if not only:
        return list(notebooks)
    names = [Path(n).name.removesuffix(".ipynb") for n in only]
    have = ", ".join(p.stem for p in notebooks) or "none"
    if not all(names):
        raise ValueError(f"--only: empty notebook name in {','.join(only)!r}; name notebooks by "
                         f"stem or prefix, e.g. --only 01 or --only 01,02 (they are: {have})")
    unknown = [n for n in names if not any(p.stem.startswith(n) for p in notebooks)]
    if unknown:
        raise ValueError(f"--only: no notebook matches {', '.join(map(repr, unknown))}; "
                         f"the notebooks are: {have}")
    return [p for p in notebooks if any(p.stem.startswith(n) for n in names)]


def parse_value(text: str) -> Any:
    """A ``-p`` value typed as papermill's CLI does: True/False, None, int, float, else string."""
    if text in ("True", "False"):
        return text == "True"
    if text == "None":
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_params(pairs: Sequence[Sequence[str]] = (), yamls: Sequence[str] = ()) -> dict[str, Any]:
    """Overrides from ``-y YAML`` strings (mappings) then ``-p KEY VALUE`` pairs (which win)."""
    import yaml

    out: dict[str, Any] = {}
    for text in yamls:
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(f"-y {text!r} is not valid YAML ({e}); "
                             "write e.g. -y 'n_trials: 50'") from None
        if not isinstance(loaded, dict):
            raise ValueError(f"-y {text!r} is not a mapping; write e.g. -y 'n_trials: 50'")
        out.update(loaded)
    for key, value in pairs:
        out[key] = parse_value(value)
    bad = [k for k in out if not isinstance(k, str) or not k.isidentifier()]
    if bad:
        raise ValueError(f"parameter names must be Python identifiers, got {bad}")
    reserved = [k for k in INJECTED if k in out]
    if reserved:
        raise ValueError(f"{reserved} cannot be overridden: choose the profile with --profile; "
                         "out_dir is results/<profile>/<notebook>, set by the runner; -p KEY "
                         "VALUE sets the field KEY of the notebook's config")
    return out


def notebook_parameters(path: Path) -> dict[str, str]:
    """``{name: default as source text}`` of the notebook's ``parameters`` cell (papermill)."""
    import papermill

    return {name: p["default"] for name, p in papermill.inspect_notebook(str(path)).items()}


def notebook_config(path: Path) -> type:
    """The experiment ``Config`` class a study notebook builds: the notebook's
    ``metadata.dropinf.config``, ``"module:Class"`` (a dataclass with ``for_profile``)."""
    ref = json.loads(path.read_text()).get("metadata", {}).get("dropinf", {}).get("config")
    if not isinstance(ref, str) or ":" not in ref:
        raise ValueError(f"{path.name}: its metadata has no dropinf.config naming the Config it "
                         'builds, e.g. {"dropinf": {"config": "package.module:Config"}}')
    module, _, name = ref.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"{path.name}: metadata dropinf.config={ref!r} cannot be imported ({e})"
                         ) from None
    return cls


def config_fields(cls: type) -> list[str]:
    """The field names of a Config dataclass, in order."""
    return [f.name for f in fields(cls)]


def check_kernel(kernel: str) -> None:
    """Refuse a Jupyter kernel that is not installed, before any notebook runs."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        KernelSpecManager().get_kernel_spec(kernel)
    except NoSuchKernel:
        raise ValueError(f"Jupyter kernel {kernel!r} is not installed; `./reproduce.sh setup` "
                         "registers 'dropinf' in .venv, or pass --kernel python3") from None


def check_overrides(params: dict[str, Any], configs: dict[str, type], profile: str,
                    warn: Log = _warn) -> dict[str, Any]:
    """Each notebook's share of the overrides, its Config built with them (``{stem: Config}``).

    An override that no selected notebook's Config has is a ValueError naming their fields; one
    that only some have is passed to those, with a warning. Each Config is built by
    ``for_profile(profile, **its overrides)`` so that a bad value is refused before any notebook
    runs, with the notebook named.
    """
    have = {stem: config_fields(cls) for stem, cls in configs.items()}
    unknown = [k for k in params if not any(k in names for names in have.values())]
    if unknown:
        theirs = "; ".join(f"{stem}: {', '.join(names)}" for stem, names in have.items())
        raise ValueError(f"-p/-y {', '.join(unknown)}: not a Config field of "
                         f"{', '.join(have)}; the fields are {theirs} "
                         "(`./reproduce.sh list` shows them with the profile's values)")
    built = {}
    for stem, cls in configs.items():
        lacking = [k for k in params if k not in have[stem]]
        if lacking:
            warn(f"-p {', '.join(lacking)}: not a Config field of {stem}; not passed to it")
        mine = {k: v for k, v in params.items() if k in have[stem]}
        try:
            built[stem] = cls.for_profile(profile, **mine)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{stem}: {e}") from None
    return built


def overrides_hash(params: dict[str, Any]) -> str:
    """8 hex digits of the SHA-256 of the overrides as canonical JSON (sorted keys, no spaces)."""
    text = json.dumps(params, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def output_dir(profile: str, params: dict[str, Any] | None = None, *,
               results_dir: str | Path | None = None, into: str | Path | None = None) -> Path:
    """Where a run writes its ``<stem>/`` directories and ``run.json`` (an absolute path).

    ``into`` when given. Else ``results_dir/<profile>`` (default ``results/``) without
    overrides, and ``results_dir/<profile>+<overrides_hash(params)>`` with them: a run with
    overrides never writes the committed results unless told to with ``into``.
    """
    if into is not None:
        return Path(into).resolve()
    results = Path(results_dir) if results_dir else repo_root() / "results"
    return (results / (f"{profile}+{overrides_hash(params)}" if params else profile)).resolve()


@dataclass
class NotebookRun:
    """Outcome of one notebook: status ``ok``, ``failed`` or ``interrupted``, and where it is.

    ``out_dir`` holds the notebook's results: this run's when ok, else the previous ones, as
    they were (if there are any). ``executed`` is the executed notebook: in ``out_dir`` when ok,
    else in the failed copy :attr:`failed_dir` (``<stem>.failed/`` beside ``out_dir``).
    ``params`` is what was injected besides ``out_dir``.
    """

    name: str
    status: str
    wall_s: float
    out_dir: Path
    executed: Path
    params: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    @property
    def failed_dir(self) -> Path | None:
        return None if self.status == "ok" else self.executed.parent

    def record(self, root: Path) -> dict[str, Any]:
        """This run as a run.json entry, its paths relative to ``root`` (the repository)."""
        paths = {"out_dir": self.out_dir, "executed": self.executed, "failed_dir": self.failed_dir}
        return {**asdict(self), **{k: portable(v, root) for k, v in paths.items()}}


def failed_copy(out_dir: Path) -> Path:
    """Where a failed or interrupted run of ``out_dir``'s notebook leaves its copy."""
    return out_dir.with_name(f"{out_dir.name}.failed")


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM off within (they are delivered on leaving), where POSIX allows."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """Within (in the main thread): SIGTERM raises KeyboardInterrupt as Ctrl-C does, so that a
    stopped run shuts its kernel down and records the interrupted notebook."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def swap_in(new: Path, dest: Path) -> None:
    """Make the complete directory ``new`` (a sibling of ``dest``) be ``dest``, replacing it.

    The old ``dest`` is renamed aside to ``.<name>.previous-XXXXXXXX``, ``new`` is renamed to
    ``dest``, then the old copy is deleted; Ctrl-C and SIGTERM are held off during the renames.
    So at every instant one complete copy exists under a known name. Recovery after a crash
    (power loss, SIGKILL): between the two renames, ``dest`` is missing and both complete copies
    are beside it: rename ``.<name>.previous-*`` (the old results) or ``.<name>.running-*`` (the
    new ones) to ``<name>``. A crash while deleting leaves part of ``.<name>.previous-*``, and
    one while a notebook runs leaves ``.<name>.running-*``: ``dest`` is complete, delete them.
    """
    aside = None
    with _signals_held():
        if dest.exists():
            aside = Path(tempfile.mkdtemp(prefix=f".{dest.name}.previous-", dir=dest.parent))
            os.replace(dest, aside)  # onto the empty directory mkdtemp made (POSIX allows it)
        os.replace(new, dest)
        fsync_dir(dest.parent)
    if aside is not None:
        shutil.rmtree(aside)


def _kernel_config() -> dict[str, Any]:
    """Encrypt the kernel's local channels where jupyter_client and zmq can (else the kernel
    prints a warning about plain-text TCP for every notebook)."""
    import zmq
    from jupyter_client import KernelManager
    from traitlets.config import Config

    if not (KernelManager.class_traits().get("transport_encryption") and zmq.has("curve")):
        return {}
    return {"config": Config({"KernelManager": {"transport_encryption": "auto"}})}


def _execute(path: Path, executed: Path, params: dict[str, Any], kernel: str,
             progress: bool) -> str | None:
    """Run the notebook ``path`` into ``executed`` with papermill: its error, None if it ran."""
    import papermill

    try:
        papermill.execute_notebook(str(path), str(executed), parameters=params,
                                   kernel_name=kernel, progress_bar=progress, cwd=str(path.parent),
                                   **_kernel_config())
    except papermill.PapermillExecutionError as e:
        return f"{e.ename}: {e.evalue} (at In [{e.exec_count}])"
    except Exception as e:  # a dead kernel, say: it must not stop the other notebooks
        return f"{type(e).__name__}: {e}"
    return None


def _name_no_machine(executed: Path, moves: dict[Path, Path]) -> None:
    """Rewrite the executed notebook so that it names no machine's directories: each path in
    ``moves`` (the run's directory, the source notebook) becomes its destination's path relative
    to the repository, in papermill's metadata, the injected parameters and the outputs."""
    if not executed.exists():
        return
    text = executed.read_text(encoding="utf-8")
    root = repo_root()
    # Longest first, so that a path is never replaced inside a longer one already rewritten;
    # only where a path starts (not after a path character: /opt/x/<root>/y is another path).
    pairs = [(str(a.resolve()), portable(b.resolve(), root)) for a, b in moves.items()]
    pairs.append((str(Path(root).resolve()) + os.sep, ""))
    for old, new in sorted(pairs, key=lambda p: -len(p[0])):
        pattern = r"(?<![\w.~/-])" + re.escape(json.dumps(old)[1:-1])
        replacement = json.dumps(new)[1:-1]
        text = re.sub(pattern, lambda _m: replacement, text)  # noqa: B023 (used at once)
    atomic_write(executed, lambda f: f.write(text.encode("utf-8")))


def run_one(path: Path, dest: Path, params: dict[str, Any], kernel: str = DEFAULT_KERNEL,
            progress: bool = True) -> NotebookRun:
    """Run one notebook with ``params`` into a fresh directory beside ``dest``.

    The notebook gets that directory as ``out_dir``. If it ran to the end, the directory
    replaces ``dest`` (:func:`swap_in`); else (an error, a dead kernel, Ctrl-C or SIGTERM)
    ``dest`` stays as it was and the directory becomes ``<stem>.failed/`` beside it, replacing an
    older failed copy. An ok run deletes the stale failed copy.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dest.name}.running-", dir=dest.parent))
    failed = failed_copy(dest)
    t0 = time.perf_counter()
    try:
        error = _execute(path, work / path.name, {**params, "out_dir": str(work)}, kernel,
                         progress)
        status = "failed" if error else "ok"
    except KeyboardInterrupt as e:
        error, status = f"interrupted ({e or 'Ctrl-C'})", "interrupted"
    wall_s = round(time.perf_counter() - t0, 2)
    final = dest if status == "ok" else failed
    try:
        _name_no_machine(work / path.name, {work: final, path: path})
    except (OSError, UnicodeError) as e:  # cosmetic: never a reason to lose the run
        _warn(f"{path.stem}: executed notebook keeps its absolute paths ({e})")
    shutil.rmtree(failed, ignore_errors=True)
    if status == "ok":
        swap_in(work, dest)
        return NotebookRun(path.stem, status, wall_s, dest, dest / path.name, params)
    os.replace(work, failed)
    return NotebookRun(path.stem, status, wall_s, dest, failed / path.name, params, error)


def run_notebooks(profile: str = DEFAULT_PROFILE, only: Sequence[str] | None = None,
                  params: dict[str, Any] | None = None, *,
                  notebooks_dir: str | Path | None = None, results_dir: str | Path | None = None,
                  into: str | Path | None = None, kernel: str = DEFAULT_KERNEL,
                  progress: bool = True, log: Log = _log, warn: Log = _warn) -> list[NotebookRun]:
    """Execute the selected notebooks in order, each into ``OUT/<stem>/`` by :func:`run_one`.

    ``OUT`` is :func:`output_dir` (``into``, else ``results/<profile>`` or, with overrides,
    ``results/<profile>+<hash>``). Each notebook gets ``profile``, ``out_dir`` and as ``config``
    those of ``params`` that are fields of its Config; an override that no selected Config has,
    or a value a Config refuses, is a ValueError (:func:`check_overrides`) raised before
    anything runs. Writes ``OUT/run.json``
    (``dropinf.study.results.manifest`` with the overrides, ``out_dir`` and one entry per notebook,
    every path relative to the repository root). Returns the outcomes: failures are in them,
    never raised. Ctrl-C or SIGTERM ends the run after the interrupted notebook, which is the
    last outcome (status ``interrupted``; its previous results kept).
    """
    check_profile(profile)
    nb_dir = Path(notebooks_dir) if notebooks_dir else repo_root() / "notebooks"
    found = find_notebooks(nb_dir)
    if not found:
        raise FileNotFoundError(f"no notebooks ({NOTEBOOK_GLOB}) in {_rel(nb_dir)}/ yet; "
                                "nothing to reproduce")
    notebooks = select(found, only)
    params = dict(params or {})
    check_kernel(kernel)
    for path in notebooks:
        missing = [n for n in INJECTED if n not in notebook_parameters(path)]
        if missing:
            warn(f"{path.stem} has no {', '.join(missing)} in a cell tagged 'parameters'; "
                 "injected anyway")
    built = check_overrides(params, {p.stem: notebook_config(p) for p in notebooks}, profile,
                            warn)

    out = output_dir(profile, params, results_dir=results_dir, into=into)
    runs: list[NotebookRun] = []
    t0 = time.perf_counter()
    with _sigterm_interrupts():
        for i, path in enumerate(notebooks, 1):
            mine = {k: v for k, v in params.items() if k in config_fields(type(built[path.stem]))}
            shown = " ".join(f"{k}={v!r}" for k, v in mine.items())
            log(f"[{i}/{len(notebooks)}] {path.stem} ({profile}{', ' + shown if shown else ''}) "
                f"-> {_rel(out / path.stem)}")
            run = run_one(path, out / path.stem, {"profile": profile, "config": mine}, kernel,
                          progress)
            log(f"[{i}/{len(notebooks)}] {run.name}: {run.status} in {run.wall_s:.1f} s")
            runs.append(run)
            if run.status == "interrupted":
                break

    seeds = {stem: cfg.seed for stem, cfg in built.items() if hasattr(cfg, "seed")}
    root = repo_root()
    write_json(out / "run.json", manifest(
        profile, params, seeds, kernel=kernel, out_dir=portable(out, root),
        wall_s=round(time.perf_counter() - t0, 2), notebooks=[r.record(root) for r in runs]))
    return runs


def summary_table(runs: Sequence[NotebookRun]) -> str:
    """The end-of-run table, then for each failure its error, failed copy and kept results."""
    rows = [("notebook", "status", "time", "executed notebook")]
    rows += [(r.name, r.status if r.status == "ok" else r.status.upper(), f"{r.wall_s:.1f} s",
              _rel(r.executed)) for r in runs]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = ["  ".join([*(c.ljust(w) for c, w in zip(row, widths)), row[3]]) for row in rows]
    failed = [r for r in runs if r.status != "ok"]
    if failed:
        lines.append(f"\n{len(failed)} of {len(runs)} notebooks did not run to the end:")
        for r in failed:
            copy = f"{_rel(r.failed_dir)}/" if r.failed_dir else "none"
            lines += [f"  {r.name}: {r.error}",
                      f"    failed copy: {copy}" + ("" if r.executed.exists()
                                                    else " (no executed notebook)"),
                      f"    kept as they were: {_rel(r.out_dir)}/" if r.out_dir.exists()
                      else f"    no earlier results in {_rel(r.out_dir)}/"]
    return "\n".join(lines)


# --------------------------------------------------------------------------- paper

# An HTML comment (a note to authors, dropped with any placeholder in it) or a placeholder.
PLACEHOLDER = re.compile(r"<!--.*?-->\n?|\{\{(.*?)\}\}", re.S)
STEM = r"(?P<stem>\d\d_\w+)"
VALUE = re.compile(STEM + r"\.(?P<key>[\w-]+(?:\.[\w-]+)*)")
FILE = re.compile(STEM + r"/(?P<kind>figures|tables)/(?P<name>[\w.-]+)")


@dataclass
class Paper:
    """What :func:`build_paper` wrote, and the placeholders it could not fill."""

    markdown: Path
    figures: list[Path]
    missing: list[str]
    pdf: Path | None = None


def _format(value: Any, spec: str) -> str:
    if isinstance(value, float) and not spec:
        return format(value, ".4g")
    return format(value, spec) if spec else str(value)


def _lookup(summary: dict[str, Any], key: str) -> Any:
    """``summary[a][b]...`` for ``key = "a.b..."`` (integers index lists); KeyError names it."""
    value: Any = summary
    for i, part in enumerate(key.split(".")):
        where = ".".join(key.split(".")[:i]) or "summary.json"
        if isinstance(value, dict) and part in value:
            value = value[part]
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            have = sorted(value) if isinstance(value, dict) else f"a {type(value).__name__}"
            raise KeyError(f"{where} has no {part!r} (it has {have})")
    if isinstance(value, dict):
        raise KeyError(f"it is a mapping; name one of its keys: {sorted(value)}")
    return value


def markdown_table(csv_path: Path, spec: str = "") -> str:
    """A CSV file as a Markdown pipe table; ``spec`` formats the cells that are numbers."""
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{csv_path} is empty")

    def cell(text: str) -> str:
        if spec:
            try:
                text = format(float(text), spec)
            except ValueError:
                pass
        return text.replace("|", r"\|")

    head, body = rows[0], rows[1:]
    lines = ["| " + " | ".join(c.replace("|", r"\|") for c in head) + " |",
             "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def provenance_table(results: Path) -> str:
    """One row per notebook with results: commit, creation time, wall time, overrides, hardware."""
    lines = ["| notebook | commit | created | wall time | parameters set | hardware |",
             "|---|---|---|---|---|---|"]
    for m_path in sorted(results.glob("*/manifest.json")):
        if not STEM_RE.fullmatch(m_path.parent.name):  # a failed copy or a run in progress
            continue
        m = json.loads(m_path.read_text())
        git = m.get("git", {})
        commit = (git.get("commit") or "unknown")[:10] + (" (dirty)" if git.get("dirty") else "")
        # papermill records what it injected in the executed notebook's metadata.
        nb_path = m_path.parent / f"{m_path.parent.name}.ipynb"
        injected = {}
        if nb_path.exists():
            meta = json.loads(nb_path.read_text()).get("metadata", {}).get("papermill", {})
            injected = meta.get("parameters", {}).get("config") or {}
        hw = m.get("hardware", {})
        machine = ", ".join(hw.get("gpus") or []) or hw.get("cpu") or "unknown"
        set_ = ", ".join(f"{k}={v!r}" for k, v in injected.items()) or "defaults"
        lines.append(f"| {m_path.parent.name} | {commit} | {m.get('created', '?')} | "
                     f"{m.get('wall_s', '?')} s | {set_} | {machine} |")
    if len(lines) == 2:
        return "(no notebook has run yet)"
    return "\n".join(lines)


def render_template(text: str, results: Path) -> tuple[str, list[str], list[tuple[Path, str]]]:
    """Fill the placeholders of a paper template from ``results`` (``results/<profile>``).

    HTML comments (notes to authors) are dropped first. Placeholders, ``{{ ... }}``:

    - ``{{ 01_theory.max_abs_z }}``: a value of ``01_theory/summary.json``; dots walk into
      nested mappings (and list indices); ``{{ 01_theory.max_abs_z | .2f }}`` formats it
      (default ``.4g`` for floats).
    - ``{{ 02_fidelity/tables/NAME }}``: ``tables/NAME.csv`` as a Markdown table
      (``| .3g`` formats its numeric cells).
    - ``{{ 01_theory/figures/NAME | caption }}``: an image of ``figures/NAME.png``, linked as
      ``figures/<stem>/NAME.png`` (the caller copies it there).
    - ``{{ provenance }}``: a table of each result's commit, time, parameters and hardware.

    A notebook without ``summary.json`` renders as ``(not run: STEM)`` and is reported in the
    missing list. A malformed placeholder, or a key, table or figure absent from a notebook
    that did run, is a ValueError listing every such placeholder with its line.

    Returns ``(markdown, missing placeholders, [(figure file, its link relative to the paper)])``.
    """
    missing: list[str] = []
    errors: list[str] = []
    copies: list[tuple[Path, str]] = []

    def fill(m: re.Match) -> str:
        if m.group(1) is None:  # a comment
            return ""
        inner = m.group(1).strip()
        line = text.count("\n", 0, m.start()) + 1
        ref, _, arg = (s.strip() for s in inner.partition("|"))
        if ref == "provenance":
            return provenance_table(results)
        value_m, file_m = VALUE.fullmatch(ref), FILE.fullmatch(ref)
        match = value_m or file_m
        if not match:
            errors.append(f"line {line}: malformed placeholder {{{{ {inner} }}}}; write "
                          "STEM.KEY, STEM/figures/NAME, STEM/tables/NAME or provenance")
            return m.group(0)
        stem = match["stem"]
        if not (results / stem / "summary.json").exists():
            missing.append(ref)
            return f"(not run: {stem})"
        try:
            if value_m:
                summary = json.loads((results / stem / "summary.json").read_text())
                return _format(_lookup(summary, value_m["key"]), arg)
            kind, name = file_m["kind"], file_m["name"]
            src = results / stem / kind / f"{name}.{'csv' if kind == 'tables' else 'png'}"
            if not src.exists():
                raise ValueError(f"{stem} ran but wrote no {kind}/{src.name}")
            if kind == "tables":
                return markdown_table(src, arg)
            copies.append((src, f"figures/{stem}/{src.name}"))
            return f"![{arg or name}]({copies[-1][1]})"
        except KeyError as e:
            errors.append(f"line {line}: {{{{ {inner} }}}}: {e.args[0]}")
        except ValueError as e:
            errors.append(f"line {line}: {{{{ {inner} }}}}: {e}")
        return m.group(0)

    out = PLACEHOLDER.sub(fill, text)
    if errors:
        raise ValueError("the paper template has placeholders that cannot be filled:\n  "
                         + "\n  ".join(errors))
    return out, missing, copies


def build_paper(profile: str = DEFAULT_PROFILE, *, results_dir: str | Path | None = None,
                template: str | Path | None = None, out_dir: str | Path | None = None,
                pdf: bool = True, log: Log = _log) -> Paper:
    """Render the paper template from ``results_dir/<profile>`` into ``out_dir/paper.md``.

    Only ``results_dir/<profile>/<stem>/`` is read: never the results of a run with overrides
    (``<profile>+<hash>/``), a failed copy or a run in progress. Defaults: ``results/``,
    ``paper/paper.template.md`` and ``paper/`` (``paper/<profile>/`` for a profile other than
    cpu-quick). Referenced figures are copied to ``out_dir/figures/`` (cleared first: it holds
    generated files only). With ``pdf`` and ``pandoc`` on the PATH, also ``out_dir/paper.pdf``;
    a missing or failing pandoc is reported, not raised.
    """
    check_profile(profile)
    root = repo_root()
    results = (Path(results_dir) if results_dir else root / "results") / profile
    template = Path(template) if template else root / "paper" / "paper.template.md"
    if out_dir is None:
        out_dir = root / "paper" / ("" if profile == DEFAULT_PROFILE else profile)
    out_dir = Path(out_dir)
    if not template.exists():
        raise FileNotFoundError(f"paper template {template} does not exist")

    text, missing, copies = render_template(template.read_text(), results)
    shutil.rmtree(out_dir / "figures", ignore_errors=True)
    for src, link in copies:
        (out_dir / link).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out_dir / link)
    header = (f"<!-- Generated by `python -m dropinf paper --profile {profile}` from "
              f"{template.name} and results/{profile}/. Do not edit: edit the template. -->\n\n")
    md = atomic_write(out_dir / "paper.md", lambda f: f.write(header + text), mode="w")
    paper = Paper(md, [out_dir / link for _, link in copies], missing)
    log(f"paper: wrote {_rel(md)} with {len(copies)} figure(s)")
    if missing:
        stems = sorted({re.split(r"[./]", m)[0] for m in missing})
        log(f"paper: {len(missing)} placeholder(s) left unfilled, notebooks not run: "
            f"{', '.join(stems)}")
    if pdf:
        paper.pdf = _pandoc(md, log)
    return paper


def _pandoc(md: Path, log: Log) -> Path | None:
    if shutil.which("pandoc") is None:
        log("paper: pandoc not found, so no PDF (install pandoc and a LaTeX engine for one)")
        return None
    out = md.with_suffix(".pdf")
    proc = subprocess.run(["pandoc", md.name, "-o", out.name, "--resource-path", "."],
                          cwd=md.parent, capture_output=True, text=True)
    if proc.returncode != 0:
        log(f"paper: pandoc failed, no PDF:\n{proc.stderr.strip()[-2000:]}")
        return None
    log(f"paper: wrote {_rel(out)}")
    return out


# --------------------------------------------------------------------------- command line

COMMANDS = ("run", "list", "paper")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dropinf",
        description="Run the dropinf study's notebooks with papermill and build the paper.",
        epilog="Without a command, `run` is meant: python -m dropinf --only 01 -p n_trials 50")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--profile", default=DEFAULT_PROFILE, choices=PROFILES,
                        help="which data and model sizes (default %(default)s)")
        sp.add_argument("--results", metavar="DIR", help="results root (default results/)")

    def paper_opts(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--template", metavar="FILE",
                        help="paper template (default paper/paper.template.md)")
        sp.add_argument("--paper-dir", metavar="DIR",
                        help="where paper.md goes (default paper/, paper/<profile>/ for gpu)")
        sp.add_argument("--no-pdf", action="store_true", help="do not call pandoc")

    run = sub.add_parser(
        "run", help="execute the notebooks, then build the paper",
        description="Execute the notebooks into results/<profile>/ and build the paper from them. "
        "With -p/-y overrides the results go to results/<profile>+<hash>/ instead (the "
        "committed ones are untouched) and the paper is not rebuilt; --into chooses the "
        "directory. A notebook's results are replaced only when it runs to the end.")
    common(run)
    run.add_argument("--only", action="append", metavar="NAME[,NAME]",
                     help="notebooks to run, by stem or prefix (01, 01_theory); repeatable")
    run.add_argument("-p", "--parameter", nargs=2, action="append", default=[],
                     metavar=("KEY", "VALUE"),
                     help="override a notebook parameter (typed: int, float, True/False, None)")
    run.add_argument("-y", "--yaml", action="append", default=[], metavar="YAML",
                     help="overrides as a YAML mapping, e.g. -y 'n_trials: 50' (-p wins)")
    run.add_argument("--kernel", default=DEFAULT_KERNEL,
                     help="Jupyter kernel (default %(default)s, registered by reproduce.sh setup)")
    run.add_argument("--notebooks", metavar="DIR", help="notebook directory (default notebooks/)")
    run.add_argument("--into", metavar="DIR",
                     help="write the results to DIR/<notebook>/ (default results/<profile>/, "
                          "results/<profile>+<hash>/ with overrides); --into results/cpu-quick "
                          "-p ... replaces the committed results")
    which = run.add_mutually_exclusive_group()
    which.add_argument("--paper", action="store_true",
                       help="rebuild the paper even with overrides (needs the run to write "
                            "results/<profile>/, so with overrides: --into results/<profile>)")
    which.add_argument("--no-paper", action="store_true", help="skip building the paper")
    run.add_argument("--no-progress", action="store_true", help="no per-cell progress bar")
    paper_opts(run)

    ls = sub.add_parser("list", help="list the notebooks, their parameters and results")
    common(ls)
    ls.add_argument("--notebooks", metavar="DIR", help="notebook directory (default notebooks/)")

    paper = sub.add_parser("paper", help="build paper/paper.md from results/<profile>/")
    common(paper)
    paper_opts(paper)
    return p


def _list(args: argparse.Namespace) -> int:
    notebooks = find_notebooks(args.notebooks)
    if not notebooks:
        _log("no notebooks yet")
        return 0
    results = (Path(args.results) if args.results else repo_root() / "results") / args.profile
    for path in notebooks:
        summary = results / path.stem / "summary.json"
        state = f"results in {_rel(summary.parent)}" if summary.exists() else "not run"
        _log(f"{path.stem}  ({args.profile}: {state})")
        cls = notebook_config(path)
        cfg = cls.for_profile(args.profile)
        _log(f"    config: {cls.__module__}.{cls.__name__} (set a field with -p NAME VALUE)")
        for name in config_fields(cls):
            _log(f"    {name} = {getattr(cfg, name)!r}")
    return 0


def _paper(args: argparse.Namespace) -> None:
    build_paper(args.profile, results_dir=args.results, template=args.template,
                out_dir=args.paper_dir, pdf=not args.no_pdf)


def _where(out: Path, committed: Path, params: dict[str, Any], into: str | None) -> str:
    """Where the run's results went, said at its end."""
    if into is not None:
        return f"results: {_rel(out)}/ (--into)"
    if not params:
        return f"results: {_rel(out)}/"
    shown = " ".join(f"{k}={v!r}" for k, v in params.items())
    return (f"results: {_rel(out)}/ (overrides {shown}; {_rel(committed)}/ untouched; "
            f"--into {_rel(committed)} would replace those)")


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dropinf [run|list|paper] ...``; returns the exit status.

    0: all ran; 1: a notebook failed or there are none; 2: bad arguments; 130: interrupted
    (Ctrl-C or SIGTERM; the paper is then not rebuilt). The paper is rebuilt after a run that
    wrote ``results/<profile>/`` without overrides, or with them and ``--paper``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0] not in COMMANDS and argv[0] not in ("-h", "--help")):
        argv.insert(0, "run")
    args = _parser().parse_args(argv)
    try:
        if args.command == "list":
            return _list(args)
        if args.command == "paper":
            _paper(args)
            return 0
        only = (None if args.only is None
                else [n.strip() for item in args.only for n in item.split(",")])
        params = parse_params(args.parameter, args.yaml)
        out = output_dir(args.profile, params, results_dir=args.results, into=args.into)
        committed = output_dir(args.profile, results_dir=args.results)
        if args.paper and out != committed:
            raise ValueError(f"--paper: the paper is built from {_rel(committed)}/ only and this "
                             f"run writes {_rel(out)}/; add --into {_rel(committed)} to replace "
                             "those results, or drop --paper")
        runs = run_notebooks(args.profile, only, params, notebooks_dir=args.notebooks,
                             into=out, kernel=args.kernel, progress=not args.no_progress)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _log("\n" + summary_table(runs) + "\n" + _where(out, committed, params, args.into))
    if runs[-1].status == "interrupted":
        print("interrupted: the remaining notebooks did not run; paper not rebuilt",
              file=sys.stderr)
        return 130
    status = 1 if any(r.status != "ok" for r in runs) else 0
    if args.no_paper:
        return status
    if out != committed or (params and not args.paper):
        _log(f"paper: not rebuilt; it is built from {_rel(committed)}/ only"
             + (", with overrides only with --paper" if out == committed else ""))
        return status
    try:
        _paper(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: paper not built: {e}", file=sys.stderr)
        status = 1
    return status
