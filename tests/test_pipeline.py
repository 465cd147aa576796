"""The papermill runner and the paper build, on tiny notebooks and fake results of our own."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import nbformat
import pytest

from dropinf.study import pipeline
from dropinf.study.pipeline import build_paper, main, parse_params, parse_value, select

# The native kernel of the running interpreter: always installed with ipykernel, unlike the
# 'dropinf' kernel that reproduce.sh registers.
KERNEL = "python3"
HEAD = 'profile = "cpu-quick"\nout_dir = None\nconfig = {}\n'
CONFIG = """
import dataclasses


@dataclasses.dataclass(frozen=True)
class Config:
{fields}
    def __post_init__(self):
        if getattr(self, "n", 0) < 0:
            raise ValueError(f"n={{self.n}} must be >= 0")

    @classmethod
    def for_profile(cls, profile, **overrides):
        return cls(**overrides)
"""


def write_nb(path: Path, fields: str, *cells: str) -> Path:
    """A notebook whose Config (dataclass fields ``fields``, one per line) is in a module beside
    it, importable once the test puts that directory on sys.path (:func:`on_path`)."""
    module = f"cfg_{path.stem}_{abs(hash(str(path))) % 10**8}"
    path.parent.mkdir(parents=True, exist_ok=True)
    body = "".join(f"    {line}\n" for line in fields.splitlines()) or "    pass\n"
    (path.parent / f"{module}.py").write_text(CONFIG.format(fields=body))
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["dropinf"] = {"config": f"{module}:Config"}
    first = nbformat.v4.new_code_cell(HEAD)
    first.metadata["tags"] = ["parameters"]
    nb.cells = [first, *(nbformat.v4.new_code_cell(c) for c in cells)]
    nbformat.write(nb, path)
    return path


@pytest.fixture
def on_path(monkeypatch):
    """Put a notebook directory on sys.path, where the runner imports the toy Configs from."""
    return lambda d: monkeypatch.syspath_prepend(str(d))


FINISH = """
import os
from dropinf.study.results import Run
Run({name!r}, profile, out_dir=out_dir).finish({body})
"""


def absolute_paths(obj) -> list[str]:
    """Every string in a JSON document that is an absolute path."""
    if isinstance(obj, dict):
        return [p for v in obj.values() for p in absolute_paths(v)]
    if isinstance(obj, list):
        return [p for v in obj for p in absolute_paths(v)]
    return [obj] if isinstance(obj, str) and Path(obj).is_absolute() else []


def snapshot(d: Path) -> dict[str, bytes]:
    return {str(f.relative_to(d)): f.read_bytes() for f in sorted(d.rglob("*")) if f.is_file()}


def test_run_injects_continues_after_failure_and_reports(tmp_path, capsys, monkeypatch,
                                                        on_path):
    monkeypatch.setattr(pipeline, "repo_root", lambda: tmp_path)  # paths in run.json are to it
    monkeypatch.chdir(tmp_path)                                    # and those shown to cwd
    nbs, res = tmp_path / "nbs", tmp_path / "res"
    on_path(nbs)
    write_nb(nbs / "01_fail.ipynb", "seed: int = 5", 'raise ValueError("boom 42")', "x = 1")
    write_nb(nbs / "02_ok.ipynb",
             'seed: int = 0\nn: int = 3\nscale: float = 1.0\nflag: bool = False\n'
             'label: str = "a"\nnothing: object = 1',
             """
import os
from dropinf.study.results import Run
v = {"n": 3, "scale": 1.0, "flag": False, "label": "a", "nothing": 1, **config}
Run("02_ok", profile, dict(n=v["n"], where=out_dir), out_dir=out_dir).finish(dict(
    **v, out_dir=out_dir, cwd=os.getcwd(),
    types=[type(v[k]).__name__ for k in ("n", "scale", "flag", "label", "nothing")]))
""")
    # Not selected by --only: must not run.
    write_nb(nbs / "03_skip.ipynb", "", 'raise RuntimeError("should not run")')
    root = res / "gpu"
    # Results of an earlier run: 01's must survive its failure, 02's be replaced as a whole.
    old = root / "01_fail"
    (old / "figures").mkdir(parents=True)
    (old / "summary.json").write_text('{"x": "old"}')
    (old / "figures" / "f.png").write_bytes(b"\x89PNG old")
    (old / "01_fail.ipynb").write_text('{"metadata": {}}')
    (old / "manifest.json").write_text("{}")
    kept = snapshot(old)
    (root / "02_ok").mkdir()
    (root / "02_ok" / "stale.png").write_bytes(b"stale")
    (root / "01_fail.failed").mkdir()
    (root / "01_fail.failed" / "older.txt").write_text("an older failed copy")
    template = tmp_path / "t.md"
    template.write_text("n = {{ 02_ok.n }}; x = {{ 01_fail.x }}\n\n{{ provenance }}\n")

    # Overrides with --into the results the paper is built from, and --paper: on purpose.
    rc = main(["--profile", "gpu", "--only", "01", "--only", "02_ok", "--notebooks",
               str(nbs), "--results", str(res), "--into", str(root), "--paper",
               "--kernel", KERNEL, "--no-progress",
               "-p", "n", "7", "-p", "scale", "2.5", "-p", "flag", "True", "-p", "nothing",
               "None", "-y", "{label: hello}", "--template", str(template),
               "--paper-dir", str(tmp_path / "paper"), "--no-pdf"])
    out, err = capsys.readouterr()
    assert rc == 1

    # The failure did not stop 02, which got the profile, its out_dir and typed overrides.
    s2 = json.loads((root / "02_ok" / "summary.json").read_text())
    assert s2["profile"] == "gpu"                       # injected over the default cpu-quick
    ran_in = Path(s2["out_dir"])                        # a fresh directory, swapped in after
    assert ran_in.parent == root.resolve() and ran_in.name.startswith(".02_ok.running-")
    assert not (root / "02_ok" / "stale.png").exists()
    assert Path(s2["cwd"]).resolve() == nbs.resolve()
    assert (s2["n"], s2["scale"], s2["flag"], s2["label"], s2["nothing"]) == (
        7, 2.5, True, "hello", None)
    assert s2["types"] == ["int", "float", "bool", "str", "NoneType"]
    assert not (root / "03_skip").exists()
    # The executed notebook names no machine's directory: paths are the repository's.
    executed = (root / "02_ok" / "02_ok.ipynb").read_text()
    assert str(tmp_path) not in executed
    pm_meta = json.loads(executed)["metadata"]["papermill"]
    assert (pm_meta["input_path"], pm_meta["output_path"]) == ("nbs/02_ok.ipynb",
                                                               "res/gpu/02_ok/02_ok.ipynb")
    assert pm_meta["parameters"]["out_dir"] == "res/gpu/02_ok"
    # 01 failed: its earlier results are as they were, its own run is in 01_fail.failed/.
    assert snapshot(old) == kept
    failed_nb = root / "01_fail.failed" / "01_fail.ipynb"
    errors = [o for c in nbformat.read(failed_nb, 4).cells if c.cell_type == "code"
              for o in c.get("outputs", []) if o.output_type == "error"]
    assert [(o.ename, o.evalue) for o in errors] == [("ValueError", "boom 42")]
    assert sorted(p.name for p in root.iterdir()) == [
        "01_fail", "01_fail.failed", "02_ok", "run.json"]   # no older failed copy, no temp dir
    assert sorted(p.name for p in (root / "01_fail.failed").iterdir()) == ["01_fail.ipynb"]

    table = out[out.index("notebook  "):]
    rows = {line.split()[0]: line.split() for line in table.splitlines()[1:3]}
    assert [rows[s][1] for s in ("01_fail", "02_ok")] == ["FAILED", "ok"]
    assert Path(rows["01_fail"][-1]).resolve() == failed_nb.resolve()
    assert Path(rows["02_ok"][-1]).resolve() == (root / "02_ok" / "02_ok.ipynb").resolve()
    assert "1 of 2 notebooks did not run to the end" in table
    assert "01_fail: ValueError: boom 42 (at In [" in table
    assert "failed copy: res/gpu/01_fail.failed/" in table
    assert "kept as they were: res/gpu/01_fail/" in table
    assert "results: res/gpu/ (--into)" in out
    assert "-p label, n, scale, flag, nothing: not a Config field of 01_fail; not passed" in err

    run = json.loads((root / "run.json").read_text())
    assert run["profile"] == "gpu" and run["kernel"] == KERNEL and run["out_dir"] == "res/gpu"
    assert run["params"] == {"n": 7, "scale": 2.5, "flag": True, "nothing": None,
                             "label": "hello"}
    assert run["seeds"] == {"01_fail": 5, "02_ok": 0}
    nb1, nb2 = run["notebooks"]
    assert [(r["name"], r["status"]) for r in (nb1, nb2)] == [("01_fail", "failed"),
                                                              ("02_ok", "ok")]
    assert nb1 | {"error": None, "wall_s": 0} == {
        "name": "01_fail", "status": "failed", "params": {"profile": "gpu", "config": {}},
        "error": None,
        "wall_s": 0, "out_dir": "res/gpu/01_fail", "failed_dir": "res/gpu/01_fail.failed",
        "executed": "res/gpu/01_fail.failed/01_fail.ipynb"}
    assert "boom 42" in nb1["error"]
    assert (nb2["out_dir"], nb2["executed"], nb2["failed_dir"]) == (
        "res/gpu/02_ok", "res/gpu/02_ok/02_ok.ipynb", None)
    assert nb2["params"]["config"]["n"] == 7 and "out_dir" not in nb2["params"]
    assert set(run["git"]) == {"commit", "dirty"} and run["packages"]["papermill"]
    manifest = json.loads((root / "02_ok" / "manifest.json").read_text())
    assert manifest["params"]["n"] == 7
    assert absolute_paths(run) == [] and absolute_paths(manifest) == []

    # --paper: built from res/gpu/, where 01's earlier results were kept.
    paper = (tmp_path / "paper" / "paper.md").read_text()
    assert "n = 7; x = old" in paper
    prov = [line for line in paper.splitlines() if line.startswith("| 02_ok ")]
    assert len(prov) == 1 and "n=7" in prov[0] and "label='hello'" in prov[0]
    assert "01_fail.failed" not in paper


def test_machine_paths_are_rewritten_where_a_path_starts_only(tmp_path, monkeypatch):
    """The repository's path is cut where a path starts; inside another path (a site-packages
    copy under a longer prefix, say) it stays, so no path is mangled."""
    root = tmp_path / "app"
    monkeypatch.setattr(pipeline, "repo_root", lambda: root)
    work, dest = root / "results" / ".x.running-1", root / "results" / "cpu" / "x"
    work.mkdir(parents=True)
    other = f"/opt/venv/site-packages{root}/mod.py"
    (work / "nb.ipynb").write_text(json.dumps(
        {"a": f"{work}/f.png; {other}; ({root}/notebooks/n.ipynb)"}))
    pipeline._name_no_machine(work / "nb.ipynb", {work: dest})
    assert json.loads((work / "nb.ipynb").read_text()) == {
        "a": f"results/cpu/x/f.png; {other}; (notebooks/n.ipynb)"}


def test_select_by_stem_and_prefix(tmp_path):
    nbs = [tmp_path / f"{s}.ipynb" for s in ("01_theory", "02_fidelity", "10_extra")]
    assert select(nbs, None) == nbs
    assert select(nbs, ["02", "01_theory"]) == nbs[:2]          # notebook order, not --only's
    assert select(nbs, ["notebooks/10_extra.ipynb"]) == nbs[2:]
    with pytest.raises(ValueError, match=r"'03'.*01_theory, 02_fidelity, 10_extra"):
        select(nbs, ["01", "03"])


def test_cli_errors_before_running_anything(tmp_path, capsys, on_path):
    nbs = tmp_path / "nbs"
    on_path(nbs)
    args = ["--notebooks", str(nbs), "--results", str(tmp_path / "res"), "--no-paper"]
    assert main(args) == 1
    assert "no notebooks" in capsys.readouterr().err
    write_nb(nbs / "01_a.ipynb", "n: int = 1\nseed: int = 0", 'raise RuntimeError("not run")')
    assert main(["run", "--only", "07", *args]) == 2
    assert "no notebook matches '07'; the notebooks are: 01_a" in capsys.readouterr().err
    for only in (",", "", "01,"):                          # an empty name is not "all of them"
        assert main(["--only", only, *args]) == 2
        assert "--only: empty notebook name" in capsys.readouterr().err
    assert main([*args, "--kernel", "python3", "-p", "n_trails", "5", "-y", "{sed: 1}"]) == 2
    assert ("-p/-y sed, n_trails: not a Config field of 01_a; the fields are 01_a: n, seed"
            in capsys.readouterr().err)
    assert main([*args, "--kernel", "python3", "-p", "n", "-1"]) == 2  # refused by the Config
    assert "01_a: n=-1 must be >= 0" in capsys.readouterr().err
    assert main([*args[:-1], "--kernel", "python3", "-p", "n", "5", "--paper"]) == 2
    err = capsys.readouterr().err
    assert "--paper: the paper is built from" in err and "add --into" in err
    assert main([*args, "--kernel", "no-such-kernel-x"]) == 2
    assert "kernel 'no-such-kernel-x' is not installed" in capsys.readouterr().err
    assert main([*args, "-p", "profile", "gpu"]) == 2
    assert "--profile" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main([*args, "--profile", "tpu"])
    assert e.value.code == 2
    assert not (tmp_path / "res").exists()
    with pytest.raises(ValueError, match="profile='tpu'"):
        pipeline.run_notebooks("tpu", notebooks_dir=nbs)


def test_parse_values_as_papermill_does():
    from papermill.cli import _resolve_type  # the behaviour we promise to match

    texts = ["7", "-3", "2.5", "1e-3", "nan", "True", "False", "None", "true", "abc", "0x1", ""]
    assert [parse_value(t) for t in texts][:9] == [7, -3, 2.5, 1e-3, pytest.approx(float("nan"),
                                                   nan_ok=True), True, False, None, "true"]
    for t in texts:
        got, want = parse_value(t), _resolve_type(t)
        assert type(got) is type(want) and (got == want or got != got), t
    assert parse_params([("a", "1")], ["{a: x, b: [1, 2]}"]) == {"a": 1, "b": [1, 2]}
    for bad in (["[1, 2]"], ["a: [1"]):
        with pytest.raises(ValueError, match="-y"):
            parse_params([], bad)
    with pytest.raises(ValueError, match="identifier"):
        parse_params([("not-a-name", "1")])


# --------------------------------------------------------------------------- paper


@pytest.fixture
def results(tmp_path) -> Path:
    """results/ with one notebook (01_a) that ran: a summary, a table and a figure."""
    d = tmp_path / "results" / "cpu-quick" / "01_a"
    (d / "tables").mkdir(parents=True)
    (d / "figures").mkdir()
    (d / "summary.json").write_text(json.dumps(
        {"notebook": "01_a", "x": 0.123456, "nested": {"k": 3}, "lst": [1, 2], "s": "hi",
         "d": {"a": 1}}))
    (d / "tables" / "t.csv").write_text("method,rho\ndropout,0.912345\na|b,0.5\n")
    (d / "figures" / "f.png").write_bytes(b"\x89PNG fake")
    return tmp_path / "results"


def _table_rows(md: str) -> list[list[str]]:
    """Parse a Markdown pipe table back into cells (undoing the escaped pipes)."""
    lines = [ln for ln in md.splitlines() if ln.startswith("|") and not ln.startswith("|---")]
    return [[c.replace(r"\|", "|") for c in re.split(r"(?<!\\) \| ", ln[2:-2])] for ln in lines]


def test_paper_fills_values_tables_figures_and_marks_missing(results, tmp_path):
    out = tmp_path / "paper"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "stale.png").write_bytes(b"old")
    template = tmp_path / "t.md"
    template.write_text(
        "# T\nX {{ 01_a.x }} / {{01_a.x|.2f}} / {{ 01_a.nested.k }} / {{ 01_a.lst.1 }} "
        "/ {{ 01_a.s }}\n\n{{ 01_a/tables/t | .2f }}\n\n{{ 01_a/figures/f | A caption }}\n"
        "{{ 02_b.y }} and {{ 02_b/figures/g }}\n<!-- a note: {{ bogus }} -->\nend\n")
    paper = build_paper(results_dir=results, template=template, out_dir=out, pdf=False,
                        log=lambda m: None)
    md = paper.markdown.read_text()
    assert md.startswith("<!-- Generated by")
    assert "X 0.1235 / 0.12 / 3 / 2 / hi\n" in md
    with open(results / "cpu-quick" / "01_a" / "tables" / "t.csv", newline="") as f:
        want = [[c if i == 0 else f"{float(c):.2f}" for i, c in enumerate(r)]
                for r in list(csv.reader(f))[1:]]
    assert _table_rows(md) == [["method", "rho"], *want]
    assert "![A caption](figures/01_a/f.png)" in md
    assert (out / "figures" / "01_a" / "f.png").read_bytes() == b"\x89PNG fake"
    assert not (out / "figures" / "stale.png").exists()
    assert paper.figures == [out / "figures" / "01_a" / "f.png"]
    assert "(not run: 02_b) and (not run: 02_b)\nend\n" in md       # the comment is gone
    assert paper.missing == ["02_b.y", "02_b/figures/g"]
    assert "bogus" not in md and "{{" not in md


def test_paper_errors_name_every_bad_placeholder(results, tmp_path):
    template = tmp_path / "t.md"
    template.write_text("{{ theory.x }}\n{{ 01_a.nope }}\n{{ 01_a.d }}\nok {{ 01_a.x }}\n"
                        "{{ 01_a/tables/none }}\n{{ 01_a/figures/none }}\n{{ }}\n"
                        "{{ 01_a.lst.5 }}\n{{ 01_a.s | .2f }}\n")
    with pytest.raises(ValueError) as e:
        build_paper(results_dir=results, template=template, out_dir=tmp_path / "p", pdf=False)
    msg = str(e.value)
    for line, text in [(1, "malformed placeholder {{ theory.x }}"), (2, "has no 'nope'"),
                       (3, "is a mapping; name one of its keys: ['a']"),
                       (5, "wrote no tables/none.csv"), (6, "wrote no figures/none.png"),
                       (7, "malformed placeholder {{  }}"), (8, "lst has no '5'"),
                       (9, "01_a.s | .2f")]:
        assert re.search(rf"line {line}: .*{re.escape(text)}", msg), (line, msg)
    assert "line 4" not in msg and "'x', 'nested'" not in msg
    assert "'d', 'lst', 'nested', 'notebook', 's', 'x'" in msg      # what 01_a does have
    assert not (tmp_path / "p" / "paper.md").exists()


def test_repo_template_renders_with_no_results(tmp_path):
    """The committed template is well formed: with no results every placeholder is 'not run'."""
    paper = build_paper(results_dir=tmp_path / "none", out_dir=tmp_path / "p", pdf=False,
                        log=lambda m: None)
    md = paper.markdown.read_text()
    assert "(not run: 01_theory)" in md and "{{" not in md
    assert {m.split(".")[0].split("/")[0] for m in paper.missing} >= {"01_theory"}
