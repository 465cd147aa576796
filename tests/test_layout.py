"""Library and study apart: ``import dropinf`` loads only the library's dependencies, the study
is the subpackage ``dropinf.study``, and the version lives in one place."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import dropinf

ROOT = Path(__file__).resolve().parents[1]
STUDY_ONLY = ("pandas", "matplotlib", "papermill", "transformers", "scipy", "sklearn")


def _python(*args: str) -> subprocess.CompletedProcess:
    """``python *args`` in a fresh interpreter with this process's sys.path (so the same
    dropinf)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_import_dropinf_loads_no_study_dependency():
    out = _python(
        "-c",
        "import sys, dropinf\n"
        "print(dropinf.__file__)\n"
        f"print(sorted(m for m in {STUDY_ONLY!r} if m in sys.modules))\n"
        "print(sorted(m for m in sys.modules if m.startswith('dropinf.study')))\n"
    )
    assert out.returncode == 0, out.stderr
    where, loaded, study = out.stdout.splitlines()
    assert Path(where) == Path(dropinf.__file__)
    assert loaded == "[]", f"import dropinf imported {loaded}"
    assert study == "[]", f"import dropinf imported {study}"


def test_study_imports_and_the_library_does_not_export_it():
    out = _python(
        "-c",
        "import dropinf, dropinf.study\n"
        "from dropinf.study import data, metrics, models, retrain\n"
        "from dropinf.study import pipeline, results\n"
        "from dropinf.study.experiments import (cost, fidelity, language, mislabel, removal,\n"
        "                                       theory)\n"
        "print([n for n in ('data', 'metrics', 'models', 'retrain', 'experiments')"
        " if n in dir(dropinf)])\n"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
    assert not {"data", "metrics", "models", "retrain"} & set(dropinf.__all__)


def test_every_loaded_dropinf_module_is_this_checkouts():
    # An import of a pre-study path (models directly under dropinf, ...) must fail, not load the
    # module from another checkout that an editable install's finder knows. pytest has imported
    # every test module by now, so their module-level imports are covered.
    here = Path(dropinf.__file__).resolve().parent
    elsewhere = {name: m.__file__ for name, m in list(sys.modules.items())
                 if (name == "dropinf" or name.startswith("dropinf."))
                 and getattr(m, "__file__", None)
                 and not Path(m.__file__).resolve().is_relative_to(here)}
    assert not elsewhere, f"dropinf modules loaded from outside {here}: {elsewhere}"


def test_data_runs_as_a_module_without_a_second_copy():
    # dropinf.study imports dropinf.study.data lazily, so runpy finds no copy of it in
    # sys.modules before running it as __main__ (which would warn).
    out = _python("-W", "error::RuntimeWarning", "-m", "dropinf.study.data", "fetch", "--help")
    assert out.returncode == 0, out.stderr
    assert "python -m dropinf.study.data fetch" in out.stdout


def test_version_in_one_place():
    tomllib = pytest.importorskip("tomllib")
    from dropinf import _version

    assert dropinf.__version__ == _version.__version__
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "dropinf._version.__version__"}
