"""``python -m dropinf featurise|score``: the library from the command line, in one process or
in every process that ``torchrun`` starts (see :mod:`dropinf.distributed`).

``featurise --task MODULE:FUNCTION`` (or ``path/to/file.py:FUNCTION``) calls ``FUNCTION(**args)``
(``--arg KEY=VALUE``, repeatable; a value is read as JSON when it parses, else as a string) in
every process. It returns ``(task, data)`` or ``(task, data, compressor)``: a
:class:`dropinf.Task`, a map-style data set (batched here with ``--batch-size`` and
``--num-workers``) or a ready ``DataLoader``, and optionally the compressor (else
``--compressor KIND --compressor-arg KEY=VALUE ...``, built by :func:`dropinf.make`). The
gradients go to the store ``--out``, as :func:`dropinf.distributed.gradients` writes it: the same
bytes with any number of processes.

``score --train STORE --test STORE`` fits a preconditioner on the training store
(:func:`dropinf.distributed.fit`) and saves, in the training store, the (n_test, n_train) scores
as ``scores/NAME.npy`` or, with ``--top-k K``, the per-test-point best ``K`` as
``scores/NAME.topK.indices.npy`` and ``scores/NAME.topK.values.npy`` (training-store row
numbers: ``G.indices`` maps them to dataset indices), each recorded in the store's manifest
with what produced it; ``--self-influence`` adds ``scores/NAME.self.npy``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from . import distributed
from .compressors import REGISTRY, Compressor, make
from .gradients import Gradients
from .store import Store
from .task import Task

COMMANDS = ("featurise", "score")
DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def _value(text: str) -> object:
    """A ``K=V`` value: True/False/None as Python spells them (or JSON's true/false/null),
    else JSON (numbers, lists), else the string."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    try:
        return json.loads(text)
    except ValueError:
        return text


def _pairs(items: list[str], flag: str) -> dict[str, object]:
    out = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.isidentifier():
            raise ValueError(f"{flag} {item!r}: give KEY=VALUE with KEY a Python name")
        out[key] = _value(value)
    return out


def _function(spec: str):
    """``module:function`` or ``path/to/file.py:function``."""
    where, colon, name = spec.rpartition(":")
    if not colon or not where or not name:
        raise ValueError(f"--task {spec!r}: give MODULE:FUNCTION or path/to/file.py:FUNCTION")
    if where.endswith(".py"):
        file = Path(where)
        if not file.is_file():
            raise ValueError(f"--task {spec!r}: no file {file}")
        mod_spec = importlib.util.spec_from_file_location(file.stem, file)
        module = importlib.util.module_from_spec(mod_spec)
        sys.modules[file.stem] = module  # so that its functions pickle (DataLoader workers)
        mod_spec.loader.exec_module(module)
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        module = importlib.import_module(where)
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ValueError(f"--task {spec!r}: {where} has no function {name!r}")
    return fn


def _device(name: str) -> torch.device:
    if name == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError(
            f"--device {name}: no CUDA device is available here (torch.cuda.is_available() is "
            "False); use --device cpu"
        )
    # LOCAL_RANK's GPU; more processes than GPUs on a node share them (coordination is gloo)
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())


def featurise(args: argparse.Namespace) -> Gradients:
    made = _function(args.task)(**_pairs(args.arg, "--arg"))
    if not isinstance(made, tuple) or len(made) not in (2, 3):
        raise TypeError(
            f"--task {args.task}: the function must return (task, data) or (task, data, "
            f"compressor), got {type(made).__name__}"
        )
    task, data, comp = (*made, None) if len(made) == 2 else made
    if not isinstance(task, Task):
        raise TypeError(f"--task {args.task}: its first result must be a dropinf.Task")
    if comp is None:
        if args.compressor is None:
            raise ValueError(
                f"give --compressor (one of {sorted(REGISTRY)}) and its --compressor-arg "
                "KEY=VALUE, or return the compressor from the --task function"
            )
        comp = make(args.compressor, **_pairs(args.compressor_arg, "--compressor-arg"))
    elif args.compressor is not None or args.compressor_arg:
        raise ValueError(
            f"--task {args.task} returns a compressor; drop --compressor and --compressor-arg"
        )
    if not isinstance(comp, Compressor):
        raise TypeError(f"the compressor must be a dropinf compressor, got {type(comp).__name__}")
    if isinstance(data, DataLoader):
        if args.batch_size is not None or args.num_workers:
            raise ValueError(
                f"--task {args.task} returns a DataLoader; drop --batch-size and --num-workers "
                "(the loader's own apply)"
            )
        loader = data
    else:
        loader = DataLoader(data, batch_size=args.batch_size or 64, num_workers=args.num_workers)
    task.model.to(_device(args.device))
    return distributed.gradients(
        task,
        loader,
        comp,
        path=args.out,
        chunk_size=args.chunk_size,
        overwrite=args.overwrite,
        progress=not args.no_progress,
        dtype=DTYPES[args.dtype],
        check=not args.no_check,
        timeout=args.timeout,
    )


def score(args: argparse.Namespace) -> list[Path]:
    """Fit, score and save (rank 0 saves); returns the files written."""
    G_train = distributed.load(args.train, timeout=args.timeout)
    G_test = distributed.load(args.test, timeout=args.timeout)
    t = args.timeout
    pre = distributed.fit(G_train, args.kind, args.damping, args.solver, timeout=t)
    meta = {
        "test": os.fspath(args.test),
        "test_data_hash": Store(args.test).manifest["gradients"]["data_hash"],
        "kind": args.kind,
        "damping": args.damping,
        "lambda": pre.lam,
        "solver": pre.info.get("solver"),
    }
    results = {}
    if args.top_k is not None:
        idx, val = distributed.top_k(
            G_test, G_train, pre, args.top_k, largest=not args.smallest, timeout=t
        )
        kept = "smallest" if args.smallest else "largest"
        m = {**meta, "top_k": args.top_k, "kept": kept, "rows": "training-store rows"}
        results[f"{args.name}.top{args.top_k}.indices"] = (idx, m)
        results[f"{args.name}.top{args.top_k}.values"] = (val, m)
    else:
        results[args.name] = (distributed.scores(G_test, G_train, pre, timeout=t), meta)
    if args.self_influence:
        s = distributed.self_influence(G_train, pre, timeout=t)
        results[f"{args.name}.self"] = (s, {k: v for k, v in meta.items() if "test" not in k})
    rank, _ = distributed.world()
    if rank != 0:
        return []
    store = Store(args.train)
    return [store.save_scores(a, name, m) for name, (a, m) in results.items()]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m dropinf",
        description="Featurise a data set into a gradient store, or score two stores. Run "
        "under torchrun to share the work: torchrun --nproc-per-node N -m dropinf featurise ...",
    )
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("featurise", help="per-sample compressed gradients into a store")
    f.add_argument(
        "--task",
        required=True,
        help="MODULE:FUNCTION or FILE.py:FUNCTION returning "
        "(task, data) or (task, data, compressor)",
    )
    f.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keyword argument of the --task function (JSON, else a string)",
    )
    f.add_argument("--compressor", choices=sorted(REGISTRY), help="compressor kind")
    f.add_argument(
        "--compressor-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="e.g. p=0.9, seed=0, factored=true",
    )
    f.add_argument("--out", required=True, type=Path, help="the store directory")
    f.add_argument("--batch-size", type=int, help="batch size of a data set (default 64)")
    f.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per process")
    f.add_argument("--dtype", choices=list(DTYPES), default="float32", help="storage dtype")
    f.add_argument("--chunk-size", type=int, default=1024, help="rows per chunk (resume unit)")
    f.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default="cpu",
        help="cuda: cuda:LOCAL_RANK under torchrun (modulo the GPUs on the node)",
    )
    f.add_argument("--overwrite", action="store_true", help="discard what the store holds")
    f.add_argument("--no-check", action="store_true", help="skip the per-sample self-check")
    f.add_argument("--no-progress", action="store_true")
    s = sub.add_parser("score", help="fit on a training store, score a test store against it")
    s.add_argument("--train", required=True, type=Path, help="training gradient store")
    s.add_argument("--test", required=True, type=Path, help="test gradient store")
    s.add_argument("--kind", choices=["fisher", "identity"], default="fisher")
    s.add_argument("--damping", type=float, default=1e-3, help="relative damping")
    s.add_argument("--solver", choices=["auto", "dense", "kernel"], default="auto")
    s.add_argument("--top-k", type=int, help="keep the K best per test point, not all scores")
    s.add_argument("--smallest", action="store_true", help="with --top-k: the most harmful")
    s.add_argument("--self-influence", action="store_true", help="also the training store's")
    s.add_argument("--name", default="scores", help="file name under the store's scores/")
    for q in (f, s):
        q.add_argument(
            "--timeout",
            type=float,
            default=distributed.TIMEOUT,
            help="seconds a process waits for the others (default %(default)s)",
        )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Returns the exit status: 0 done, 1 failed (the error is printed), 2 bad arguments."""
    args = _parser().parse_args(argv)
    ours = not (dist.is_available() and dist.is_initialized())
    try:
        if args.command == "featurise":
            G = featurise(args)
            if distributed.world()[0] == 0:
                print(f"{args.out}: {G.shape[0]} x {G.shape[1]} gradients ({G.compressor})")
        else:
            for path in score(args):
                print(path)
    except (ValueError, TypeError, distributed.DistributedError) as e:
        rank, size = distributed.world()
        who = f"rank {rank} of {size}: " if size > 1 else ""
        print(f"python -m dropinf {args.command}: {who}{e}", file=sys.stderr)
        return 1
    finally:
        if ours and dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
