"""Where a run's results go and when they replace the earlier ones: a fake checkout in a temporary
directory, its notebooks 'executed' by a stand-in for papermill (no kernel, so fast)."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from test_pipeline import absolute_paths, snapshot, write_nb

from dropinf.study import pipeline, results
from dropinf.study.pipeline import main, overrides_hash
from dropinf.study.results import Run, portable

KERNEL = "python3"
ARGS = ["--kernel", KERNEL, "--no-progress", "--no-pdf"]


@pytest.fixture
def study(tmp_path, monkeypatch) -> Path:
    """A checkout: notebooks 01_a and 02_b, a paper template, committed results of both."""
    for mod in (pipeline, results):
        monkeypatch.setattr(mod, "repo_root", lambda: tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "notebooks"))  # where the toy Configs are
    for stem in ("01_a", "02_b"):
        write_nb(tmp_path / "notebooks" / f"{stem}.ipynb", "seed: int = 0\nn: int = 1",
                 'raise RuntimeError("papermill is faked here")')
        committed = tmp_path / "results" / "cpu-quick" / stem
        (committed / "figures").mkdir(parents=True)
        (committed / "summary.json").write_text('{"n": "committed"}')
        (committed / "figures" / "f.png").write_bytes(b"\x89PNG committed")
    (tmp_path / "results" / "cpu-quick" / "run.json").write_text("{}")
    (tmp_path / "paper").mkdir()
    (tmp_path / "paper" / "paper.template.md").write_text("a = {{ 01_a.n }}, b = {{ 02_b.n }}\n")
    (tmp_path / "paper" / "paper.md").write_text("the committed paper\n")
    return tmp_path


def fake_papermill(monkeypatch, **behaviour: str) -> list[str]:
    """Replace the notebook execution: each notebook writes its results as Run does (n, and a
    manifest with its out_dir among the params), then does ``behaviour[stem]``: ``ok`` (default),
    ``fail``, ``interrupt`` (raises KeyboardInterrupt) or ``sigterm`` (is sent SIGTERM)."""
    ran: list[str] = []

    def execute(path, executed, params, kernel, progress):
        ran.append(path.stem)
        executed.write_text(json.dumps({"metadata": {"papermill": {"parameters": params}}}))
        out = params["out_dir"]
        n = params["config"].get("n", 1)
        Run(path.stem, params["profile"], {"n": n, "where": out}, out_dir=out).finish({"n": n})
        what = behaviour.get(path.stem, "ok")
        if what == "interrupt":
            raise KeyboardInterrupt
        if what == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
            raise AssertionError("SIGTERM did not interrupt the run")
        return "RuntimeError: boom (at In [2])" if what == "fail" else None

    monkeypatch.setattr(pipeline, "_execute", execute)
    return ran


def n_of(d: Path):
    return json.loads((d / "summary.json").read_text())["n"]


def listing(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_run_without_overrides_swaps_in_and_rebuilds_paper(study, monkeypatch, capsys):
    committed = study / "results" / "cpu-quick"
    (committed / "01_a" / "stale.txt").write_text("from an older run")
    fake_papermill(monkeypatch)
    assert main(ARGS) == 0
    assert n_of(committed / "01_a") == n_of(committed / "02_b") == 1
    assert listing(committed) == ["01_a", "02_b", "run.json"]     # no temp or previous copy
    assert listing(committed / "01_a") == ["01_a.ipynb", "manifest.json", "summary.json"]
    assert (study / "paper" / "paper.md").read_text().endswith("a = 1, b = 1\n")
    assert "results: results/cpu-quick/\n" in capsys.readouterr().out

    run = json.loads((committed / "run.json").read_text())
    manifest = json.loads((committed / "01_a" / "manifest.json").read_text())
    assert run["out_dir"] == "results/cpu-quick" and run["params"] == {}
    assert run["notebooks"][0]["executed"] == "results/cpu-quick/01_a/01_a.ipynb"
    assert manifest["params"]["where"].startswith("results/cpu-quick/.01_a.running-")
    assert absolute_paths(run) == [] and absolute_paths(manifest) == []


def test_override_run_goes_to_its_own_directory(study, monkeypatch, capsys):
    committed = study / "results" / "cpu-quick"
    before, paper = snapshot(study / "results"), (study / "paper" / "paper.md").read_bytes()
    ran = fake_papermill(monkeypatch)
    assert main(["--only", "01", "-p", "n", "50", *ARGS]) == 0

    h = overrides_hash({"n": 50})
    assert re.fullmatch(r"[0-9a-f]{8}", h) and h != overrides_hash({"n": 51})
    assert overrides_hash({"a": 1, "b": 2}) == overrides_hash({"b": 2, "a": 1})
    mine = study / "results" / f"cpu-quick+{h}"
    assert ran == ["01_a"] and listing(mine) == ["01_a", "run.json"] and n_of(mine / "01_a") == 50
    run = json.loads((mine / "run.json").read_text())
    assert run["params"] == {"n": 50} and run["out_dir"] == f"results/cpu-quick+{h}"
    assert absolute_paths(run) == []
    # The committed results and the paper built from them are untouched.
    assert {k: v for k, v in snapshot(study / "results").items()
            if not k.startswith(f"cpu-quick+{h}")} == before
    assert (study / "paper" / "paper.md").read_bytes() == paper
    out = capsys.readouterr().out
    assert f"results: results/cpu-quick+{h}/ (overrides n=50; results/cpu-quick/ untouched" in out
    assert "paper: not rebuilt" in out

    # --into the committed results: replaced notebook by notebook; the paper on request only.
    assert main(["--only", "01", "-p", "n", "50", "--into", "results/cpu-quick", *ARGS]) == 0
    assert n_of(committed / "01_a") == 50 and n_of(committed / "02_b") == "committed"
    assert (study / "paper" / "paper.md").read_bytes() == paper
    assert "with overrides only with --paper" in capsys.readouterr().out
    assert main(["--only", "02", "-p", "n", "7", "--into", "results/cpu-quick", "--paper",
                 *ARGS]) == 0
    assert (study / "paper" / "paper.md").read_text().endswith("a = 50, b = 7\n")
    assert json.loads((committed / "run.json").read_text())["params"] == {"n": 7}

    # --into elsewhere: written there; the paper, built from results/cpu-quick/ only, is not.
    assert main(["--only", "01", "--into", "scratch/try", *ARGS]) == 0
    assert listing(study / "scratch" / "try") == ["01_a", "run.json"]
    assert "paper: not rebuilt; it is built from results/cpu-quick/ only\n" in (
        capsys.readouterr().out)


def test_failure_keeps_the_previous_results(study, monkeypatch, capsys):
    committed = study / "results" / "cpu-quick"
    before = snapshot(committed / "01_a")
    fake_papermill(monkeypatch, **{"01_a": "fail"})
    assert main(["--no-paper", *ARGS[:-1]]) == 1
    assert snapshot(committed / "01_a") == before                   # byte for byte
    assert n_of(committed / "02_b") == 1                            # the others ran on
    failed = committed / "01_a.failed"
    assert n_of(failed) == 1 and listing(committed) == ["01_a", "01_a.failed", "02_b", "run.json"]
    out = capsys.readouterr().out
    assert "failed copy: results/cpu-quick/01_a.failed/" in out
    assert "kept as they were: results/cpu-quick/01_a/" in out
    entry = json.loads((committed / "run.json").read_text())["notebooks"][0]
    assert (entry["status"], entry["failed_dir"], entry["executed"], entry["out_dir"]) == (
        "failed", "results/cpu-quick/01_a.failed", "results/cpu-quick/01_a.failed/01_a.ipynb",
        "results/cpu-quick/01_a")

    # A second failure replaces the failed copy; a success swaps in and drops it.
    (failed / "marker").write_text("first failure")
    assert main(["--only", "01", "--no-paper", *ARGS[:-1]]) == 1
    assert not (failed / "marker").exists() and snapshot(committed / "01_a") == before
    fake_papermill(monkeypatch)
    assert main(["--only", "01", "--no-paper", *ARGS[:-1]]) == 0
    assert n_of(committed / "01_a") == 1 and listing(committed) == ["01_a", "02_b", "run.json"]


@pytest.mark.parametrize("how", ["interrupt", "sigterm"])
def test_interruption_keeps_the_previous_results(study, monkeypatch, capsys, how):
    committed = study / "results" / "cpu-quick"
    before, paper = snapshot(committed), (study / "paper" / "paper.md").read_bytes()
    handler = signal.getsignal(signal.SIGTERM)
    ran = fake_papermill(monkeypatch, **{"01_a": how})
    assert main(ARGS) == 130
    assert ran == ["01_a"]                                          # 02 was not started
    assert {k: v for k, v in snapshot(committed).items()
            if k.split("/")[0] in ("01_a", "02_b")} == {k: v for k, v in before.items()
                                                        if k != "run.json"}
    assert (study / "paper" / "paper.md").read_bytes() == paper
    assert listing(committed) == ["01_a", "01_a.failed", "02_b", "run.json"]
    run = json.loads((committed / "run.json").read_text())
    assert [(r["name"], r["status"]) for r in run["notebooks"]] == [("01_a", "interrupted")]
    assert "INTERRUPTED" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is handler              # ours is undone


def test_portable_paths(tmp_path):
    doc = {"a": str(tmp_path / "x" / "y"), "b": [tmp_path / "z", "rel/ative", 3, None],
           "c": ("/elsewhere/f",), "d": {"e": tmp_path}}
    assert portable(doc, tmp_path) == {"a": "x/y", "b": ["z", "rel/ative", 3, None],
                                       "c": [os.path.relpath("/elsewhere/f", tmp_path)],
                                       "d": {"e": "."}}
    assert absolute_paths(portable(doc, tmp_path)) == []


def test_git_state_ignores_the_study_outputs(tmp_path):
    """A run's own results (swapped in notebook by notebook) do not make it 'dirty'; a change to
    the code does."""
    import subprocess

    from dropinf.study.results import git_state

    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "results" / "p" / "nb").mkdir(parents=True)
    (tmp_path / "paper" / "figures").mkdir(parents=True)
    files = ["results/p/nb/summary.json", "paper/paper.md", "paper/figures/a.png", "code.py"]
    for f in files:
        (tmp_path / f).write_text("0")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    assert git_state(tmp_path)["dirty"] is False
    for f in files[:3]:
        (tmp_path / f).write_text("1")
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("1")
    assert git_state(tmp_path)["dirty"] is True
