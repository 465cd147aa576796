"""The experiment modules' shared pieces: named random streams, threads, profiles and
validation (``common``), the time and memory measurements (``measure``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from dropinf.study.experiments import common, measure

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("0*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_committed_without_outputs(path):
    code = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code)
    assert "parameters" in code[0]["metadata"].get("tags", [])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_parameters_are_profile_out_dir_and_its_configs_overrides(path):
    """One place per knob: the parameters cell is profile, out_dir and config = {}; the Config the
    runner validates -p against (metadata) is the one the notebook builds from ``config``."""
    from dropinf.study import pipeline

    assert pipeline.notebook_parameters(path) == {"profile": '"cpu-quick"', "out_dir": "None",
                                                  "config": "{}"}
    cls = pipeline.notebook_config(path)
    nb = json.loads(path.read_text())
    module = nb["metadata"]["dropinf"]["config"].split(":")[0].rsplit(".", 1)[1]
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    built = [c for c in code if f"{module}.Config.for_profile(profile, **config)" in
             "".join(c["source"])]
    assert len(built) == 1 and code.index(built[0]) == 1
    assert "Config.for_profile" not in "".join("".join(c["source"]) for c in code[2:])
    for profile in ("cpu-quick", "gpu"):
        assert isinstance(cls.for_profile(profile), cls)


def test_seed_streams():
    a = common.rng_for(0, "mc", "x", 0.5).random(4)
    np.testing.assert_array_equal(a, common.rng_for(0, "mc", "x", 0.5).random(4))
    assert not np.allclose(a, common.rng_for(0, "mc", "x", 0.7).random(4))
    assert not np.allclose(a, common.rng_for(1, "mc", "x", 0.5).random(4))
    assert common.seed_for(0, "a") == common.seed_for(0, "a") != common.seed_for(0, "b")
    assert 0 <= common.seed_for(7, "a", 1) < 2**31 - 1


def test_threads_sets_and_restores():
    before = torch.get_num_threads()
    with common.threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with common.threads(0):  # 0 leaves torch's setting
        assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), common.threads(1):
        raise RuntimeError("restored on the way out")
    assert torch.get_num_threads() == before


@dataclass(frozen=True)
class _Cfg:
    a: int = 1
    b: float = 0.5


def test_from_profile_applies_overrides_and_names_what_is_wrong():
    profiles = {"quick": {}, "big": {"a": 10}}
    assert common.from_profile(_Cfg, profiles, "big", {}) == _Cfg(10, 0.5)
    assert common.from_profile(_Cfg, profiles, "big", {"b": None}) == _Cfg(10, None)  # a value
    assert common.from_profile(_Cfg, profiles, "big", {"a": 3, "b": 2.0}) == _Cfg(3, 2.0)
    with pytest.raises(ValueError, match="profile='gpu' is not one of \\['big', 'quick'\\]"):
        common.from_profile(_Cfg, profiles, "gpu", {})
    with pytest.raises(TypeError, match="unknown Config field\\(s\\) \\['c'\\]"):
        common.from_profile(_Cfg, profiles, "quick", {"c": 1})


@pytest.mark.parametrize("value, ok", [(3, True), (np.int64(3), True), (2, True), (1, False),
                                       (True, False), (2.0, False), ("3", False)])
def test_check_int(value, ok):
    cfg = _Cfg(a=value)
    if ok:
        common.check_int(cfg, "a", 2)
    else:
        with pytest.raises(ValueError, match="a=.* must be an integer >= 2"):
            common.check_int(cfg, "a", 2)


def test_time_calls_counts_calls():
    n = {"calls": 0}

    def fn():
        n["calls"] += 1

    t = measure.time_calls(fn, torch.device("cpu"), warmup=2, repeats=3)
    assert t.calls == 3 and n["calls"] == 5 and 0 <= t.min <= t.median


def test_peak_bytes_sees_an_allocation():
    if not measure.reset_peak():
        pytest.skip("the kernel does not allow resetting the resident-set high-water mark")
    n = 64 * 2**20
    peak = measure.peak_bytes(lambda: torch.ones(n // 4).sum(), torch.device("cpu"))
    assert 0.9 * n <= peak <= 3 * n


def test_cpu_seconds_count_this_process_and_its_children():
    import subprocess
    import sys

    own, both = measure.own_cpu_s(), measure.own_cpu_s(children=True)
    assert 0 < own <= both
    code = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.2: pass"
    subprocess.run([sys.executable, "-c", code], check=True)
    assert measure.own_cpu_s(children=True) - measure.own_cpu_s() >= both - own + 0.15
    assert measure.machine_busy_s() > 0 and measure.proc_status_kb("VmRSS") > 0


def test_other_load_is_busy_time_minus_our_own(monkeypatch):
    """With fake clocks: 4 cores, 2 s of wall time, 5 busy CPU-seconds of which 1 is ours (3 with
    our finished subprocesses): others kept 2 (or 1) cores busy."""
    clocks = {"busy": [10.0, 15.0], "own": [1.0, 2.0], "kids": [0.0, 2.0], "wall": [100.0, 102.0]}
    calls = {k: 0 for k in clocks}

    def tick(name):
        v = clocks[name][min(calls[name], 1)]
        calls[name] += 1
        return v

    def own(children=False):
        return tick("own") + (tick("kids") if children else 0.0)

    monkeypatch.setattr(measure, "machine_busy_s", lambda: tick("busy"))
    monkeypatch.setattr(measure, "own_cpu_s", own)
    monkeypatch.setattr(measure.time, "perf_counter", lambda: tick("wall"))
    monkeypatch.setattr(measure.os, "cpu_count", lambda: 4)
    for children, cpus in ((False, 2.0), (True, 1.0)):
        for k in calls:
            calls[k] = 0
        with measure.OtherLoad(min_wall=1.0, children=children) as load:
            pass
        assert load.cpus == pytest.approx(cpus) and load.share == pytest.approx(cpus / 4)
    for k in calls:
        calls[k] = 0
    short = measure.OtherLoad(min_wall=5.0).start()
    assert np.isnan(short.stop()) and np.isnan(short.cpus)  # 2 s: too short to say


@dataclass(frozen=True)
class _Named:
    methods: object = ("a",)


def test_check_names_normalises_and_refuses_naming_the_field():
    cfg = _Named(["b", "a"])
    assert common.check_names(cfg, "methods", ("a", "b")) == ("b", "a") == cfg.methods
    assert common.check_names(_Named("a"), "methods", ("a",)) == ("a",)  # one string, one name
    assert common.check_names(_Named(()), "methods", ("a",), empty=True) == ()
    for bad in (("a", "a"), ("c",), (), 3):
        with pytest.raises(ValueError, match=r"methods=.*choose distinct names from \('a', 'b'\)"):
            common.check_names(_Named(bad), "methods", ("a", "b"))


def test_float_list():
    assert common.float_list("r", 2) == (2.0,)
    assert common.float_list("r", [1, 2.5, np.float64(3)]) == (1.0, 2.5, 3.0)
    for bad in ("12", [1, "x"], None):
        with pytest.raises(ValueError, match="r=.* must be a list of numbers"):
            common.float_list("r", bad)
    with pytest.raises(ValueError, match="r is empty"):
        common.float_list("r", [])
