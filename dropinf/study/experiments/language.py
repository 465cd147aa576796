"""Notebook 06 (language): influence of training documents on a causal language model.

What ``notebooks/06_language.ipynb`` computes, here so that it is tested:

- a GPT-2 fine-tuned on training documents (:func:`prepare`): ``cpu-quick`` pretrains a tiny
  GPT-2 of :data:`dropinf.study.models.GPT2_LADDER` from its config on one part of the standard
  library's docstrings (:func:`dropinf.study.data.stdlib_corpus`), then fine-tunes it on the
  ``n_train`` training documents; ``gpu`` fine-tunes the released GPT-2 small on subsets of
  OpenWebText and CNN/DailyMail (:func:`dropinf.study.data.webtext`). A document is one fixed-length
  chunk. Influence is that of the fine-tuning documents, from the fine-tuned model's per-sample
  gradients of its blocks' linear (Conv1D) layers, as LoGra and GraSS attribute LMs;
- for every method at matched compressed dimension k and the same relative damping, the
  agreement of its scores with the uncompressed ones (:func:`agreement`): Spearman per test
  document and top-k overlap, against the compression ratio d / k, over several draws. Scores
  use the damped empirical Fisher (:func:`fisher_scores`) and, as a second view, plain gradient
  dot products;
- the coherence of real test-train gradient pairs (:func:`coherence`),
  which sets a mask's variance against a projection's (DESIGN section 3);
- removal of the documents most helpful to a set of target test documents by each method's
  scores, re-fine-tuning from the same checkpoint with several seeds, against removing random
  documents (:func:`removal`);
- the cost of each method at this scale (:func:`cost_table`: compression step per batch, map
  bytes; timings go to tables, never to the summary);
- the composed methods (family ``composed`` of :data:`~.methods.METHODS`), beyond the paper
  (DESIGN section 6): a flat dropout mask to ``oversample * k`` coordinates followed by an SJLT
  down to k, one :class:`dropinf.Chain`.

Sign convention: positive score = helpful (removing the document raises the test loss). Every
random choice comes from ``cfg.seed`` through named streams (:func:`~.common.seed_for`).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from ... import theory as th
from ...compressors import Compressor, Identity
from ...curvature import Preconditioner
from ...gradients import gradients
from ...losses import causal_lm
from ...persample import PerSampleGrads
from ...scores import scores as influence_scores
from ...task import Task
from .. import data as dd
from .. import metrics
from ..models import GPT2_LADDER, gpt2_ladder, train
from .common import Profiled, check_int, float_list, rng_for, seed_for
from .measure import compression_step, time_calls
from .methods import IDENTITY, Match, color, compressors, in_family, label, match, spec
from .theory import crossover_coherence

REFERENCE = IDENTITY
METHODS = compressors()
CURVATURES = ("fisher", "dot")
CORPORA = ("stdlib", *dd.WEBTEXT)
MB = 2**20
COLUMNS = 1 << 20  # pair statistics accumulate over slices of this many gradient columns


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class Config(Profiled):
    """Every knob of notebook 06; the defaults are the ``cpu-quick`` profile.

    Data: documents of ``seq_len`` tokens from each corpus of ``corpora`` (``"stdlib"``: the
    standard library's docstrings of ``packages``, None for all; or a
    :data:`dropinf.study.data.WEBTEXT` name), ``n_train`` training and ``n_test`` test documents.

    Model: ``pretrained`` (a Hugging Face name such as ``"gpt2"``) is fine-tuned; else the
    :data:`~dropinf.study.models.GPT2_LADDER` rung ``model`` is pretrained from its config on
    ``n_pretrain`` further documents (``pretrain_epochs``, ``pretrain_lr``), disjoint from the
    training and test documents. Fine-tuning on the training documents: Adam, ``epochs``,
    ``lr``, ``batch_size``, ``weight_decay``. Gradients: the blocks' Conv1D layers whose module
    names start with one of ``layers`` (None: all of them), in batches of ``grad_batch``.

    Methods: :data:`METHODS` (a subset in ``methods``) at each compression ratio of ``ratios``:
    k is the dimension of factored dropout closest to ``d / ratio`` (:func:`~.methods.match`);
    the others match that k. ``n_mask_seeds`` draws per method. The dense Gaussian runs where
    its map takes at most ``dense_max_mb``; PCA where k is at most the number of training
    gradients it is fitted on. Fisher damping ``damping`` (relative: a fraction of the mean
    eigenvalue, the same for every method); top-``top_k`` overlap.
    A composed method keeps ``oversample * k`` coordinates before its SJLT.

    Removal: ``n_targets`` test documents; the ``remove_fraction`` of training documents with the
    largest summed score over them, by each of ``removal_methods`` at ``removal_ratio`` (first
    draw), is removed and the model re-fine-tuned with ``n_retrain_seeds`` seeds.

    Cost: ``timing_repeats`` timed compression steps per method. ``threads``: torch's CPU
    threads (0: torch's default); ``device``: ``"cpu"`` or ``"cuda"``.
    """

    seed: int = 0
    corpora: tuple[str, ...] = ("stdlib",)
    packages: tuple[str, ...] | None = dd.DOCSTRING_CLASSES
    model: str = "nano"
    pretrained: str | None = None
    layers: tuple[str, ...] | None = None
    seq_len: int = 64
    n_pretrain: int = 2048
    n_train: int = 512
    n_test: int = 64
    pretrain_epochs: int = 4
    pretrain_lr: float = 5e-3
    epochs: int = 3
    lr: float = 1e-3
    batch_size: int = 16
    weight_decay: float = 0.0
    grad_batch: int = 64
    ratios: tuple[float, ...] = (4.0, 16.0, 64.0)
    methods: tuple[str, ...] = METHODS
    n_mask_seeds: int = 3
    damping: float = 0.1
    top_k: int = 10
    dense_max_mb: float = 256.0
    oversample: int = 4
    n_targets: int = 8
    remove_fraction: float = 0.1
    removal_ratio: float = 16.0
    removal_methods: tuple[str, ...] = (
        REFERENCE, "dropout", "dropout_factored", "gaussian_factored", "sjlt",
    )  # fmt: skip  (data: which methods this profile re-fine-tunes for)
    n_retrain_seeds: int = 3
    timing_repeats: int = 5
    threads: int = 1
    device: str = "cpu"

    def __post_init__(self) -> None:
        for name in ("corpora", "methods", "removal_methods", "packages", "layers"):
            value = getattr(self, name)
            if value is None and name in ("packages", "layers"):
                continue
            if isinstance(value, str):
                value = (value,)
            if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{name}={value!r} must be a list of names")
            if not value:
                raise ValueError(f"{name} is empty; give at least one name")
            object.__setattr__(self, name, tuple(value))
        value = float_list("ratios", self.ratios)
        if any(not r >= 1 for r in value):
            raise ValueError(f"ratios={value!r} must be compression ratios d/k >= 1")
        object.__setattr__(self, "ratios", tuple(sorted(set(value))))
        for name in self.corpora:
            if name not in CORPORA:
                raise ValueError(f"corpora contains {name!r}; choose from {CORPORA}")
        for name in self.methods:
            if name not in compressors():
                raise ValueError(f"methods contains {name!r}; choose from {compressors()}")
        for name in self.removal_methods:
            if name != REFERENCE and name not in self.methods:
                raise ValueError(
                    f"removal_methods contains {name!r}, which is neither {REFERENCE!r} nor in "
                    f"methods={self.methods}"
                )
        if self.pretrained is None and self.model not in GPT2_LADDER:
            raise ValueError(f"model={self.model!r} must be a rung of {list(GPT2_LADDER)}")
        if self.pretrained is not None and self.n_pretrain:
            raise ValueError(
                f"n_pretrain={self.n_pretrain} with pretrained={self.pretrained!r}: a pretrained "
                "model is not pretrained again; set n_pretrain=0"
            )
        if any(c != "stdlib" for c in self.corpora) and self.pretrained is None:
            raise ValueError(
                "web text is tokenised with a pretrained model's tokenizer: set pretrained "
                "(e.g. 'gpt2') for corpora other than 'stdlib'"
            )
        if self.removal_ratio not in self.ratios:
            raise ValueError(
                f"removal_ratio={self.removal_ratio!r} must be one of ratios={self.ratios}"
            )
        for name, low in (("seed", 0), ("seq_len", 2), ("n_pretrain", 0), ("n_train", 2),
                          ("n_test", 1), ("pretrain_epochs", 1), ("epochs", 1),
                          ("batch_size", 1), ("grad_batch", 1), ("n_mask_seeds", 1),
                          ("top_k", 1), ("oversample", 1), ("n_targets", 1),
                          ("n_retrain_seeds", 1), ("timing_repeats", 1), ("threads", 0)):
            check_int(self, name, low)
        for name in ("pretrain_lr", "lr", "damping", "dense_max_mb"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"{name}={v!r} must be a number > 0")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay={self.weight_decay!r} must be a number >= 0")
        if self.top_k > self.n_train:
            raise ValueError(f"top_k={self.top_k} exceeds n_train={self.n_train}")
        if self.n_targets > self.n_test:
            raise ValueError(f"n_targets={self.n_targets} exceeds n_test={self.n_test}")
        if not 0 < self.remove_fraction < 1 or self.n_remove < 1:
            raise ValueError(
                f"remove_fraction={self.remove_fraction!r} must be in (0, 1) and remove at "
                f"least one of the {self.n_train} training documents"
            )
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device={self.device!r} must be 'cpu' or 'cuda'")

    @property
    def n_remove(self) -> int:
        """Training documents removed per target set: ``round(remove_fraction * n_train)``."""
        return round(self.remove_fraction * self.n_train)


PROFILES: dict[str, dict] = {
    "cpu-quick": {},
    "gpu": {
        "corpora": ("openwebtext", "cnn_dailymail"),
        "packages": None,
        "pretrained": "gpt2",
        "layers": ("transformer.h.11",),  # the last block: d = 7.1M, identity fits in RAM
        "seq_len": 128,
        "n_pretrain": 0,
        "n_train": 1000,
        "n_test": 100,
        "epochs": 2,
        "lr": 5e-5,
        "batch_size": 8,
        "grad_batch": 16,
        "ratios": (16.0, 64.0, 256.0, 1024.0),
        "dense_max_mb": 8192.0,
        "n_targets": 10,
        "remove_fraction": 0.05,
        "threads": 0,
        "device": "cuda",
    },
}


# --------------------------------------------------------------------------- model and data


@dataclass
class LM:
    """A fine-tuned causal LM with its documents and exact per-sample gradients.

    ``train`` / ``test``: ``input_ids`` and ``attention_mask``, (n, T). ``base``: the checkpoint
    every fine-tuning starts from. ``model``: ``base`` fine-tuned on all of ``train`` with the
    first fine-tuning seed; ``task`` selects its gradient's parameters. ``G_train`` (n_train, d)
    and ``G_test`` (n_test, d): float32 per-sample gradients of the mean next-token loss (Identity
    compressor); ``test_loss`` (n_test,) that loss per test document.
    """

    corpus: str
    provenance: dict
    train: dict[str, Tensor]
    test: dict[str, Tensor]
    base: nn.Module
    model: nn.Module
    task: Task
    G_train: Tensor
    G_test: Tensor
    test_loss: np.ndarray
    pretrain_loss: list[float]
    finetune_loss: list[float]
    grad_s: float

    @property
    def d(self) -> int:
        return self.G_train.shape[1]

    def loader(self, split: str, batch: int) -> Any:
        return dd.tensor_loader(self.train if split == "train" else self.test, batch_size=batch)


def load_corpus(cfg: Config, name: str) -> tuple[dd.TextCorpus, dict[str, Tensor] | None]:
    """The corpus ``name`` split into training, test and (``stdlib``) pretraining documents.

    ``stdlib``: one seeded split of the docstring corpus into ``n_test`` test then
    ``n_pretrain + n_train`` documents, of which the first ``n_pretrain`` are returned apart, for
    pretraining. Web text: ``n_train`` and ``n_test`` documents tokenised with the pretrained
    model's tokenizer; no pretraining set (None).
    """
    if name == "stdlib":
        corpus = dd.stdlib_corpus(cfg.seq_len, n_train=cfg.n_pretrain + cfg.n_train,
                                  n_test=cfg.n_test, seed=cfg.seed, packages=cfg.packages)
        pre = {k: v[: cfg.n_pretrain] for k, v in corpus.train.items()}
        train_ = {k: v[cfg.n_pretrain :] for k, v in corpus.train.items()}
        corpus = dataclasses.replace(
            corpus, train=train_, train_sources=corpus.train_sources[cfg.n_pretrain :],
            provenance={**corpus.provenance, "pretraining": f"the first {cfg.n_pretrain} of the "
                        "non-test documents; the rest are the training documents"})
        return corpus, (pre if cfg.n_pretrain else None)
    tok = dd.pretrained_tokenizer(cfg.pretrained)
    return dd.webtext(name, tok, cfg.seq_len, n_train=cfg.n_train, n_test=cfg.n_test,
                      seed=cfg.seed), None


def gradient_params(model: nn.Module, layers: tuple[str, ...] | None) -> list[str]:
    """Names of the Conv1D modules (GPT-2's linear layers) whose gradients count: all of them,
    or those whose name starts with one of ``layers``."""
    names = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D"]
    if layers is not None:
        names = [n for n in names if any(n.startswith(p) for p in layers)]
    if not names:
        raise ValueError(f"layers={layers!r} selects no Conv1D layer of the model")
    return names


def base_model(cfg: Config, pretrain: dict[str, Tensor] | None, progress: bool = True
               ) -> tuple[nn.Module, list[float]]:
    """The checkpoint to fine-tune, on ``cfg.device``, and its pretraining losses per epoch:
    the pretrained weights, or the ladder rung initialised and pretrained from named seeds."""
    dev = torch.device(cfg.device)
    if cfg.pretrained is not None:
        return dd.pretrained(cfg.pretrained).to(dev).eval(), []
    model = gpt2_ladder(cfg.model, seed=seed_for(cfg.seed, "init")).to(dev)
    if pretrain is None:
        return model.eval(), []
    _, hist = train(model, causal_lm, pretrain, seed=seed_for(cfg.seed, "pretrain"),
                    epochs=cfg.pretrain_epochs, batch_size=cfg.batch_size, lr=cfg.pretrain_lr,
                    progress=progress, desc="pretrain")
    return model, hist.epoch_loss


def finetune_seeds(cfg: Config) -> list[int]:
    """Seeds of the fine-tuning runs (data order and any dropout); the first gives the model
    whose gradients are attributed."""
    return [seed_for(cfg.seed, "finetune", j) for j in range(cfg.n_retrain_seeds)]


def fine_tune(cfg: Config, base: nn.Module, train_docs: dict[str, Tensor], keep: np.ndarray,
              seed: int) -> tuple[nn.Module, list[float]]:
    """A copy of ``base`` fine-tuned on the documents ``keep`` from ``seed``, in eval mode, and
    its loss per epoch."""
    model = copy.deepcopy(base)
    idx = torch.as_tensor(np.asarray(keep), dtype=torch.long)
    sub = {k: v[idx] for k, v in train_docs.items()}
    _, hist = train(model, causal_lm, sub, seed=seed, epochs=cfg.epochs,
                    batch_size=cfg.batch_size, lr=cfg.lr, weight_decay=cfg.weight_decay,
                    progress=False)
    return model, hist.epoch_loss


def doc_losses(model: nn.Module, docs: dict[str, Tensor], batch: int = 64) -> np.ndarray:
    """(n,) mean next-token loss (nats) of each document, float64, in eval mode."""
    dev = next(model.parameters()).device
    was = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for b in dd.tensor_loader(docs, batch_size=batch):
            out.append(causal_lm(model, {k: v.to(dev) for k, v in b.items()}).double().cpu())
    model.train(was)
    return torch.cat(out).numpy()


def prepare(cfg: Config, corpus_name: str, progress: bool = True) -> LM:
    """Load the corpus, build or load the base model, fine-tune it on all training documents
    (first fine-tuning seed) and take the exact per-sample gradients of both splits."""
    corpus, pre = load_corpus(cfg, corpus_name)
    base, pre_loss = base_model(cfg, pre, progress)
    model, ft_loss = fine_tune(cfg, base, corpus.train, np.arange(cfg.n_train),
                               finetune_seeds(cfg)[0])
    task = Task(model, causal_lm, params=gradient_params(model, cfg.layers))
    lm = LM(corpus_name, corpus.provenance, corpus.train, corpus.test, base, model, task,
            torch.empty(0, 0), torch.empty(0, 0), doc_losses(model, corpus.test), pre_loss,
            ft_loss, 0.0)
    t0 = time.perf_counter()
    lm.G_train, lm.G_test = compressed(lm, Identity(), cfg.grad_batch)
    lm.grad_s = time.perf_counter() - t0
    return lm


def compressed(lm: LM, comp: Compressor, batch: int) -> tuple[Tensor, Tensor]:
    """(n_train, k) and (n_test, k) float32 gradients of ``lm`` compressed by ``comp``."""
    return tuple(gradients(lm.task, lm.loader(s, batch), comp, progress=False).data
                 for s in ("train", "test"))


# --------------------------------------------------------------------------- methods


def method_compressor(method: str, m: Match, seed: int, cfg: Config
                      ) -> tuple[Compressor | None, str]:
    """The unbound compressor of ``method`` at the matched setting ``m``, or None and why not:
    a fitted method (PCA, fitted on the ``n_train`` training gradients by
    :func:`compress_method`) where k exceeds them, another whose stored map exceeds
    ``dense_max_mb``."""
    s, opts = spec(method), {"pca_n_fit": cfg.n_train, "oversample": cfg.oversample}
    if s.needs_fit:
        if m.k > cfg.n_train:
            return None, f"does not fit: k={m.k} directions from {cfg.n_train} training gradients"
    elif (need := s.stored_bytes(m, **opts)) > cfg.dense_max_mb * MB:
        return None, (f"does not fit: its map needs {need / MB:,.0f} MB > "
                      f"dense_max_mb={cfg.dense_max_mb:g}")
    return s.compressor(m, seed, **opts), "ok"


def compress_method(lm: LM, method: str, comp: Compressor, batch: int) -> tuple[Tensor, Tensor]:
    """Training and test gradients compressed by ``method`` (``comp`` from
    :func:`method_compressor`; a fitted method is fitted on ``lm.G_train`` here)."""
    if spec(method).needs_fit:
        comp.fit(lm.G_train)
    return compressed(lm, comp, batch)


# --------------------------------------------------------------------------- scores


def fisher_scores(G_test: Tensor, G_train: Tensor, damping: float) -> tuple[Tensor, Tensor]:
    """Damped-Fisher influence scores and gradient dot products, both (n_test, n_train) float64.

    ``S = G_test (F + lambda I)^{-1} G_train^T`` with ``F = G_train^T G_train / n`` and relative
    damping ``lambda = damping tr(F) / dim``: the library's :class:`~dropinf.Preconditioner`,
    which takes the n x n kernel form when dim > n (the uncompressed reference has dim = d), so
    no dim x dim matrix is formed. Positive = helpful.
    """
    if not damping > 0:
        raise ValueError(f"damping={damping!r} must be > 0 (the Fisher of n < dim is singular)")
    pre = Preconditioner.fit(G_train, kind="fisher", damping=damping)
    dot = Preconditioner.fit(G_train, kind="identity")
    return (influence_scores(G_test, G_train, pre).double(),
            influence_scores(G_test, G_train, dot).double())


def agreement_row(S: Tensor, S_ref: Tensor, top_k: int) -> dict[str, float]:
    """Mean over test documents of the Spearman correlation with the reference scores, and the
    top-``top_k`` overlap (most helpful documents)."""
    return {
        "spearman": metrics.per_test_correlation(S.numpy(), S_ref.numpy(), "spearman",
                                                 n_boot=0).value,
        "topk_overlap": metrics.topk_overlap(S.numpy(), S_ref.numpy(), top_k, n_boot=0).value,
    }


@dataclass
class Agreement:
    """Per (method, ratio, draw, curvature) agreement rows (``table``), and the Fisher scores
    (n_test, n_train) of each method's first draw at ``cfg.removal_ratio`` (``scores``, with the
    reference under :data:`REFERENCE`)."""

    table: pd.DataFrame
    scores: dict[str, Tensor]


def agreement(cfg: Config, lm: LM, progress: bool = True) -> Agreement:
    """Every method of ``cfg.methods`` at every ratio, ``cfg.n_mask_seeds`` draws each (PCA is
    deterministic: one), against the uncompressed scores of the same curvature.

    Table columns: corpus, method, ratio (nominal), k, actual ratio ``d / k``, seed, curvature
    (``fisher`` or ``dot``), spearman, topk_overlap, status, map_bytes, grad_s (seconds to
    compress both splits, through :func:`dropinf.gradients`).
    """
    S_ref, A_ref = fisher_scores(lm.G_test, lm.G_train, cfg.damping)
    refs = {"fisher": S_ref, "dot": A_ref}
    kept = {REFERENCE: S_ref}
    rows = []
    cells = [(r, m, s) for r in cfg.ratios for m in cfg.methods
             for s in range(1 if spec(m).needs_fit else cfg.n_mask_seeds)]  # fitted: exact
    dims = {r: match(lm.task, ratio=r) for r in cfg.ratios}
    for ratio, method, s in tqdm(cells, desc=f"{lm.corpus}: agreement", unit="draw",
                                 disable=not progress):
        k = dims[ratio].k
        cseed = seed_for(cfg.seed, "compressor", method, ratio, s)
        comp, status = method_compressor(method, dims[ratio], cseed, cfg)
        base = {"corpus": lm.corpus, "method": method, "ratio": ratio, "k": k,
                "actual_ratio": lm.d / k, "seed": s}
        if comp is None:
            rows += [{**base, "curvature": c, "status": status} for c in CURVATURES]
            continue
        t0 = time.perf_counter()
        Gtr, Gte = compress_method(lm, method, comp, cfg.grad_batch)
        grad_s = time.perf_counter() - t0
        if Gtr.shape[1] != k:
            raise RuntimeError(f"{method} gave dimension {Gtr.shape[1]}, not the matched k={k}")
        S, A = fisher_scores(Gte, Gtr, cfg.damping)
        for curv, est in (("fisher", S), ("dot", A)):
            rows.append({**base, "curvature": curv, "status": "ok",
                         "map_bytes": comp.map_bytes, "grad_s": grad_s,
                         **agreement_row(est, refs[curv], cfg.top_k)})
        if ratio == cfg.removal_ratio and s == 0:
            kept[method] = S
    return Agreement(pd.DataFrame(rows), kept)


def aggregate(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard deviation over draws (ddof 1; NaN for one draw) of each metric, per
    (corpus, curvature, method, ratio), with k, the actual ratio and the number of draws."""
    ok = table[table["status"] == "ok"]
    keys = ["corpus", "curvature", "method", "ratio"]
    out = ok.groupby(keys, sort=False).agg(
        k=("k", "first"), actual_ratio=("actual_ratio", "first"), n_draws=("seed", "size"),
        spearman_mean=("spearman", "mean"), spearman_std=("spearman", "std"),
        topk_mean=("topk_overlap", "mean"), topk_std=("topk_overlap", "std"),
    )
    return out.reset_index()


def agreement_at(agg: pd.DataFrame, ratio: float, curvature: str = "fisher",
                 corpus: str | None = None) -> dict[str, dict[str, float | None]] | None:
    """``method -> {mean, std, n_draws}`` of the Spearman agreement at one ratio (None if that
    ratio was not run); std is None for a single draw (PCA is deterministic)."""
    g = agg[(agg["curvature"] == curvature) & np.isclose(agg["ratio"], ratio)]
    if corpus is not None:
        g = g[g["corpus"] == corpus]
    if g.empty:
        return None
    return {r.method: {"mean": _round(r.spearman_mean), "std": _round(r.spearman_std),
                       "n_draws": int(r.n_draws)} for r in g.itertuples()}


def _round(x: float, digits: int = 4) -> float | None:
    return None if x is None or not np.isfinite(x) else round(float(x), digits)


# --------------------------------------------------------------------------- coherence


def coherence(cfg: Config, lm: LM) -> tuple[dict[str, Any], pd.DataFrame, np.ndarray]:
    """Coherence ``d sum(a^2 b^2) / (|a|^2 |b|^2)`` of every test-train gradient pair, and what
    it predicts for a fixed-size mask against a Gaussian projection of the same k.

    Returns ``(stats, by_layer, values)``: ``stats`` with d, the number of pairs, the median,
    mean and 10%/90% quantiles, the range of the per-layer medians, and per ratio of
    ``cfg.ratios`` the share of pairs where the mask's closed-form variance (DESIGN section 3)
    is below the Gaussian's (``mask_wins``), the median variance ratio, and the crossover
    coherence at cosine 0; ``by_layer`` the same
    quantiles of the pairs restricted to each layer's weights and bias; ``values`` all pair
    coherences (pairs with a zero gradient left out).
    """
    st = th.PairStats.pairwise(lm.G_test, lm.G_train, chunk=COLUMNS, device=cfg.device)
    ok = (st.aa * st.bb) > 0
    values = st.coherence[ok]
    stats: dict[str, Any] = {"d": lm.d, "n_pairs": int(ok.sum()), **_quantiles(values)}
    by_ratio = {}
    for ratio in cfg.ratios:
        k = match(lm.task, ratio=ratio).k
        vm = th.variance(st, "fixed", k)[ok]
        vg = th.variance(st, "gaussian", k)[ok]
        by_ratio[_ratio_key(ratio)] = {
            "k": k, "mask_wins": _round(float(np.mean(vm < vg))),
            "variance_ratio_median": _round(float(np.median(vm / vg))),
            "crossover_at_cos0": (None if k >= lm.d  # a mask that keeps everything is exact
                                  else _round(crossover_coherence(lm.d, 1.0 - k / lm.d, 0.0))),
        }
    stats["by_ratio"] = by_ratio
    rows = []
    for layer in gradient_params(lm.model, None):
        cols = [q for q in lm.task.params if q.name.startswith(layer + ".")]
        if not cols:
            continue
        # a layer's weight and bias are adjacent in the gradient: a column slice, not a copy
        lo, hi = min(q.offset for q in cols), max(q.stop for q in cols)
        if hi - lo != sum(q.numel for q in cols):
            raise RuntimeError(f"the parameters of {layer} are not contiguous in the gradient")
        sl = th.PairStats.pairwise(lm.G_test[:, lo:hi], lm.G_train[:, lo:hi],
                                   chunk=COLUMNS, device=cfg.device)
        good = (sl.aa * sl.bb) > 0
        rows.append({"corpus": lm.corpus, "layer": layer, "d_layer": hi - lo,
                     **_quantiles(sl.coherence[good])})
    meds = [r["median"] for r in rows if r["median"] is not None]
    stats["layer_median_range"] = [min(meds), max(meds)] if meds else None
    return stats, pd.DataFrame(rows), values


def _quantiles(x: np.ndarray) -> dict[str, float | None]:
    if not len(x):
        return {"median": None, "mean": None, "q10": None, "q90": None}
    q10, med, q90 = np.quantile(x, [0.1, 0.5, 0.9])
    return {"median": _round(med, 3), "mean": _round(float(x.mean()), 3), "q10": _round(q10, 3),
            "q90": _round(q90, 3)}


def _ratio_key(ratio: float) -> str:
    return f"{ratio:g}x"


# --------------------------------------------------------------------------- removal


def targets(cfg: Config) -> np.ndarray:
    """The ``n_targets`` test documents whose helpful training documents are removed (sorted)."""
    return np.sort(rng_for(cfg.seed, "targets").permutation(cfg.n_test)[: cfg.n_targets])


def most_helpful(S: Tensor | np.ndarray, rows: np.ndarray, n_remove: int) -> np.ndarray:
    """The ``n_remove`` training documents with the largest summed score over the test rows
    ``rows`` of S (n_test, n_train), i.e. the most helpful to their summed loss; ties go to the
    lower index. Sorted."""
    total = np.asarray(S)[rows].sum(0)
    return np.sort(np.argsort(-total, kind="stable")[:n_remove])


def removal_sets(cfg: Config, scores: dict[str, Tensor], tgt: np.ndarray) -> dict[str, np.ndarray]:
    """What each of ``cfg.removal_methods`` removes (methods without scores are skipped)."""
    return {m: most_helpful(scores[m], tgt, cfg.n_remove)
            for m in cfg.removal_methods if m in scores}


def random_set(cfg: Config, j: int) -> np.ndarray:
    """The random documents removed with fine-tuning seed number j (sorted)."""
    return np.sort(rng_for(cfg.seed, "random removal", j).permutation(cfg.n_train)[: cfg.n_remove])


def removal(cfg: Config, lm: LM, scores: dict[str, Tensor], progress: bool = True
            ) -> pd.DataFrame:
    """Remove each method's most helpful documents for the targets, re-fine-tune from the same
    checkpoint with every fine-tuning seed, and measure the change in test loss.

    One row per (method or ``random``, seed): ``target_loss_change`` (mean over target documents
    of the loss after removal minus the loss of the model fine-tuned on everything with the same
    seed; positive: the removed documents were helpful), ``target_ppl_change`` (the same for
    ``exp`` of the targets' mean loss), ``other_loss_change`` (over the other test documents),
    ``overlap_with_reference`` (share of the reference's removed documents also removed).
    """
    tgt = targets(cfg)
    others = np.setdiff1d(np.arange(cfg.n_test), tgt)
    sets = removal_sets(cfg, scores, tgt)
    ref = sets.get(REFERENCE)
    everything = np.arange(cfg.n_train)
    seeds = finetune_seeds(cfg)
    jobs = [(j, m) for j in range(len(seeds)) for m in ["full", *sets, "random"]]
    rows, full = [], {}
    for j, method in tqdm(jobs, desc=f"{lm.corpus}: re-fine-tune", unit="model",
                          disable=not progress):
        if method == "full":
            model_ = lm.model if j == 0 else fine_tune(cfg, lm.base, lm.train, everything,
                                                       seeds[j])[0]
            full[j] = lm.test_loss if j == 0 else doc_losses(model_, lm.test)
            continue
        removed = random_set(cfg, j) if method == "random" else sets[method]
        model_, _ = fine_tune(cfg, lm.base, lm.train, np.setdiff1d(everything, removed),
                              seeds[j])
        loss = doc_losses(model_, lm.test)
        base = full[j]
        rows.append({
            "corpus": lm.corpus, "method": method, "seed": j, "n_removed": len(removed),
            "target_loss_change": float(loss[tgt].mean() - base[tgt].mean()),
            "target_ppl_change": float(np.exp(loss[tgt].mean()) - np.exp(base[tgt].mean())),
            "other_loss_change": float(loss[others].mean() - base[others].mean())
            if len(others) else math.nan,
            "target_loss_full": float(base[tgt].mean()),
            "overlap_with_reference": (len(np.intersect1d(removed, ref)) / len(ref)
                                       if ref is not None else math.nan),
        })
    return pd.DataFrame(rows)


def removal_summary(df: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """``method -> {target_loss_change, target_ppl_change, other_loss_change: {mean, std}, ...}``
    over fine-tuning seeds, the overlap of its removed set with the reference's, and
    ``excess_over_random``: the paired difference of its target loss change and random
    removal's with the same seed, ``{mean, std}`` over seeds."""
    rand = df[df["method"] == "random"].set_index("seed")["target_loss_change"]
    out = {}
    for method, g in df.groupby("method", sort=False):
        entry: dict[str, Any] = {"n_seeds": len(g), "n_removed": int(g["n_removed"].iloc[0])}
        for col in ("target_loss_change", "target_ppl_change", "other_loss_change"):
            entry[col] = {"mean": _round(g[col].mean(), 5), "std": _round(g[col].std(), 5)}
        if method != "random":
            entry["overlap_with_reference"] = _round(g["overlap_with_reference"].iloc[0])
            if len(rand):
                diff = g.set_index("seed")["target_loss_change"] - rand
                entry["excess_over_random"] = {"mean": _round(diff.mean(), 5),
                                               "std": _round(diff.std(), 5)}
        out[method] = entry
    return out


# --------------------------------------------------------------------------- cost


def cost_table(cfg: Config, lm: LM, progress: bool = True) -> pd.DataFrame:
    """Per method and ratio (first draw): the compression step on one batch of ``grad_batch``
    training documents (median ms over ``timing_repeats`` calls after one warm-up, from the fully
    captured layer factors to the (B, k) output, :func:`~.measure.compression_step`), the map
    bytes it must store, and the fit (PCA) in seconds.
    Times vary between runs: they belong in tables, not in the summary."""
    dev = torch.device(cfg.device)
    batch = next(iter(lm.loader("train", cfg.grad_batch)))
    batch = {k: v.to(dev) for k, v in batch.items()}
    with lm.task.evaluating(), PerSampleGrads(lm.task) as psg:
        bg = psg(batch)[0]
        rows = [_cost_row(cfg, lm, REFERENCE, Identity(), lm.d, bg, 0.0, 1.0)]
        cells = [(r, m) for r in cfg.ratios for m in cfg.methods]
        dims = {r: match(lm.task, ratio=r) for r in cfg.ratios}
        for ratio, method in tqdm(cells, desc=f"{lm.corpus}: cost", unit="method",
                                  disable=not progress):
            k = dims[ratio].k
            cseed = seed_for(cfg.seed, "compressor", method, ratio, 0)
            comp, status = method_compressor(method, dims[ratio], cseed, cfg)
            if comp is None:
                rows.append({"corpus": lm.corpus, "method": method, "ratio": ratio, "k": k,
                             "status": status})
                continue
            fit_s = 0.0
            if spec(method).needs_fit:
                t0 = time.perf_counter()
                comp.fit(lm.G_train)
                fit_s = time.perf_counter() - t0
            rows.append(_cost_row(cfg, lm, method, comp.bind(lm.task), k, bg, fit_s, ratio))
    return pd.DataFrame(rows)


def cost_text(df: pd.DataFrame, ratio: float) -> str:
    """One sentence on the compression step and the stored map at ``ratio``, from
    :func:`cost_table` (times: for display, not for the summary)."""
    parts = []
    for corpus, g in df.groupby("corpus", sort=False):
        g = g[(g["ratio"] == ratio) & (g["status"] == "ok")]
        if g.empty:
            continue
        items = ", ".join(f"{label(r.method)} {r.compress_ms:.1f} ms"
                          + (f" ({r.map_bytes / MB:.1f} MB map)" if r.map_bytes else "")
                          for r in g.sort_values("compress_ms").itertuples())
        parts.append(f"{corpus}, {ratio:g}x, batch of {int(g['batch'].iloc[0])}: {items}")
    return "Compression step per batch (median; this machine, this load): " + "; ".join(parts)


def _cost_row(cfg: Config, lm: LM, method: str, comp: Compressor, k: int, bg, fit_s: float,
              ratio: float) -> dict[str, Any]:
    step = compression_step(comp.bind(lm.task), bg)
    t = time_calls(step, torch.device(cfg.device), 1, cfg.timing_repeats)
    return {"corpus": lm.corpus, "method": method, "ratio": ratio, "k": k, "status": "ok",
            "batch": bg.size, "compress_ms": 1e3 * t.median, "compress_ms_min": 1e3 * t.min,
            "calls": t.calls, "map_bytes": comp.map_bytes, "fit_s": fit_s,
            "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- summary and text


def summary(cfg: Config, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The JSON summary (no timings): the first corpus's numbers at top level, and every
    corpus's under ``by_corpus`` when there are several. ``results[corpus]`` holds ``lm``,
    ``agg``, ``coherence`` (stats), ``removal`` (DataFrame) and ``cost`` (DataFrame)."""
    per = {name: _corpus_summary(cfg, name, r) for name, r in results.items()}
    first = next(iter(per.values()))
    out = {**first}
    if len(per) > 1:
        out["by_corpus"] = per
    return out


def _corpus_summary(cfg: Config, name: str, r: dict[str, Any]) -> dict[str, Any]:
    lm, agg = r["lm"], r["agg"]
    maps = r["cost"].dropna(subset=["map_bytes"])
    return {
        "corpus": name,
        "provenance": {k: lm.provenance[k] for k in ("source", "licence") if k in lm.provenance},
        "d": lm.d,
        "n_train": int(lm.G_train.shape[0]),
        "n_test": int(lm.G_test.shape[0]),
        "test_loss": _round(float(lm.test_loss.mean())),
        "test_perplexity": _round(float(np.exp(lm.test_loss.mean()))),
        "damping": cfg.damping,
        "agreement_16x": agreement_at(agg, 16.0, "fisher", name),
        "agreement_64x": agreement_at(agg, 64.0, "fisher", name),
        "agreement_dot_16x": agreement_at(agg, 16.0, "dot", name),
        "agreement_dot_64x": agreement_at(agg, 64.0, "dot", name),
        "topk_overlap": {
            _ratio_key(ratio): {
                row.method: {"mean": _round(row.topk_mean), "std": _round(row.topk_std)}
                for row in agg[(agg["curvature"] == "fisher") & (agg["ratio"] == ratio)
                               & (agg["corpus"] == name)].itertuples()}
            for ratio in cfg.ratios},
        "removal_effect": removal_summary(r["removal"]),
        "coherence": r["coherence"],
        "map_bytes": {f"{row.method}@{_ratio_key(row.ratio)}": int(row.map_bytes)
                      for row in maps.itertuples() if row.method != REFERENCE},
    }


def conclude(cfg: Config, results: dict[str, dict[str, Any]]) -> str:
    """Markdown conclusions written from the numbers of :func:`summary` (deterministic)."""
    lines = []
    for name, r in results.items():
        s = _corpus_summary(cfg, name, r)
        lines.append(f"**{name}** (d = {s['d']:,} gradient coordinates, {s['n_train']} training "
                     f"and {s['n_test']} test documents; test perplexity "
                     f"{s['test_perplexity']:.2f}):")
        for key, curv in (("agreement", "damped Fisher"), ("agreement_dot", "gradient dot "
                                                                          "products")):
            parts = []
            for ratio in ("16x", "64x"):
                a = s.get(f"{key}_{ratio}")
                if a:
                    ranked = sorted(a.items(), key=lambda kv: -kv[1]["mean"])
                    parts.append(f"at {ratio}: " + ", ".join(
                        f"{label(m)} {v['mean']:.2f}"
                        + (f" ± {v['std']:.2f}" if v["std"] is not None else " (deterministic)")
                        for m, v in ranked))
            if parts:
                lines.append(f"- Spearman agreement with the uncompressed scores ({curv}; mean ± "
                             f"sd over draws) " + "; ".join(parts) + ".")
        lines += _mask_verdict(s)
        lines += _section6_text(s)
        lines += _coherence_text(s)
        lines += _removal_text(s)
    return "\n".join(lines)


# DESIGN.md section 6's first measurement (tiny character-level GPT-2, gradient dot products,
# Spearman against uncompressed at 16x / 64x), quoted for comparison only.
SECTION6 = {"dropout": (0.83, 0.59), "dropout_factored": (0.71, 0.52),
            "gaussian": (0.96, 0.88)}


def _section6_text(s: dict[str, Any]) -> list[str]:
    a16, a64 = s.get("agreement_dot_16x") or {}, s.get("agreement_dot_64x") or {}
    here = [f"{label(m)} {a16[m]['mean']:.2f} / {a64[m]['mean']:.2f} (there {x:.2f} / {y:.2f})"
            for m, (x, y) in SECTION6.items() if m in a16 and m in a64]
    out = []
    if here:
        out.append("- With plain gradient dot products, as in DESIGN.md section 6's first "
                   "measurement on a character-level GPT-2, Spearman at 16x / 64x here: "
                   + "; ".join(here) + ".")
    a64 = s.get("agreement_64x") or {}
    for m in in_family(a64, "fitted"):
        out.append(f"- {label(m)} ({a64[m]['mean']:.2f} at 64x with Fisher) is "
                   "fitted on the very training gradients it scores and needs them uncompressed "
                   "first, so it is an upper reference, not a competitor at equal cost.")
    return out


def _coherence_text(s: dict[str, Any]) -> list[str]:
    c = s["coherence"]
    if c["median"] is None:
        return []
    wins = c["by_ratio"].get("16x")
    line = (f"- Coherence of test-train gradient pairs: median {c['median']:.1f} (10-90%: "
            f"{c['q10']:.1f} to {c['q90']:.1f}) over d = {c['d']:,}; 1 means mass spread evenly.")
    if c.get("layer_median_range"):
        lo, hi = c["layer_median_range"]
        line += (f" Within single layers the median is {lo:.1f} to {hi:.1f}, so part of the "
                 "concentration comes from layers whose gradients are larger than others'.")
    if wins:
        line += (f" At 16x a fixed mask has less variance than a Gaussian projection of the same "
                 f"k for {100 * wins['mask_wins']:.0f}% of pairs (it would need coherence below "
                 f"{wins['crossover_at_cos0']:.2f} at cosine 0); the median variance ratio mask / "
                 f"Gaussian is {wins['variance_ratio_median']:.1f}. That is why the masks trail "
                 "the projections here.")
    return [line]


def _mask_verdict(s: dict[str, Any]) -> list[str]:
    out = []
    for ratio in ("16x", "64x"):
        a = s.get(f"agreement_{ratio}") or {}
        if "dropout" in a and "sjlt" in a:
            gap = a["sjlt"]["mean"] - a["dropout"]["mean"]
            fact = a.get("dropout_factored")
            sd = math.hypot(a["sjlt"]["std"] or 0.0, a["dropout"]["std"] or 0.0)
            margin = max(0.02, 2 * sd)
            verdict = ("loses to" if gap > margin else "beats" if gap < -margin else "matches")
            out.append(
                f"- At {ratio} the plain random mask (flat dropout) {verdict} SJLT by "
                f"{abs(gap):.2f} in Spearman ({a['dropout']['mean']:.2f} vs "
                f"{a['sjlt']['mean']:.2f})" + (
                    f"; factored dropout reaches {fact['mean']:.2f}" if fact else "")
                + "".join(f"; {label(m)} reaches {a[m]['mean']:.2f}"
                          for m in in_family(a, "composed")) + ".")
    return out


def _removal_text(s: dict[str, Any]) -> list[str]:
    rem = s["removal_effect"]
    if not rem:
        return []
    rand = rem.get("random")
    n = next(iter(rem.values()))["n_removed"]
    parts = [f"{label(m)} {v['target_loss_change']['mean']:+.4f} ± "
             f"{v['target_loss_change']['std'] or 0:.4f}"
             for m, v in rem.items() if m != "random"]
    line = (f"- Removing the {n} training documents most helpful to the target test documents "
            f"and re-fine-tuning changed the targets' mean loss (nats per token; mean ± sd over "
            f"seeds) by: " + ", ".join(parts))
    if not rand:
        return [line + "."]
    rc = rand["target_loss_change"]
    line += f"; removing {n} random documents: {rc['mean']:+.4f} ± {rc['std'] or 0:.4f}."
    excess = {m: v["excess_over_random"] for m, v in rem.items() if "excess_over_random" in v}
    clear = [m for m, e in excess.items() if e["std"] is not None and e["mean"] > 2 * e["std"]]
    line += (" Paired with random removal on the same seed, the excess is " + ", ".join(
        f"{label(m)} {e['mean']:+.4f} ± {e['std'] or 0:.4f}" for m, e in excess.items())
        + "; " + (f"more than twice its sd for {', '.join(label(m) for m in clear)}"
                  if clear else "no method's excess exceeds twice its sd") + ".")
    ref = rem.get(REFERENCE)
    if ref is not None:
        others = {m: v for m, v in rem.items() if m not in ("random", REFERENCE)}
        if others:
            best = max(others, key=lambda m: others[m]["target_loss_change"]["mean"])
            worst = min(others, key=lambda m: others[m]["target_loss_change"]["mean"])
            line += (f" Against the uncompressed reference "
                     f"({ref['target_loss_change']['mean']:+.4f}), the compressed methods range "
                     f"from {label(worst)} ({others[worst]['target_loss_change']['mean']:+.4f}) "
                     f"to {label(best)} ({others[best]['target_loss_change']['mean']:+.4f}); "
                     "their removed sets share " + ", ".join(
                         f"{100 * v['overlap_with_reference']:.0f}% ({label(m)})"
                         for m, v in others.items()) + " of the reference's documents.")
        o = [v["other_loss_change"]["mean"] for v in rem.values()]
        line += (f" On the other test documents the change is {min(o):+.4f} to {max(o):+.4f} "
                 "for every removal (a control: targeted removal should hurt the targets most).")
    return [line]


# --------------------------------------------------------------------------- figures




def plot_agreement(agg: pd.DataFrame, top_k: int, n_train: int):
    """Spearman and top-k overlap with the uncompressed scores against the compression ratio
    (mean ± sd over draws): two rows of panels per corpus (damped Fisher, dot products), columns
    Spearman and top-k overlap; one legend below."""
    import matplotlib.pyplot as plt

    corpora = list(dict.fromkeys(agg["corpus"]))
    fig, axes = plt.subplots(2 * len(corpora), 2, figsize=(11, 7.2 * len(corpora)),
                             squeeze=False)
    ratios = sorted(set(agg["ratio"]))
    for i, corpus in enumerate(corpora):
        for a, curv in enumerate(CURVATURES):
            g = agg[(agg["corpus"] == corpus) & (agg["curvature"] == curv)]
            for b, metric in enumerate(("spearman", "topk")):
                ax = axes[2 * i + a, b]
                for method in dict.fromkeys(g["method"]):
                    r = g[g["method"] == method].sort_values("actual_ratio")
                    ax.errorbar(r["actual_ratio"], r[f"{metric}_mean"],
                                yerr=r[f"{metric}_std"].fillna(0), fmt="o", ms=5, capsize=3,
                                color=color(method), label=label(method),
                                ls="--" if spec(method).family == "composed" else "-", lw=1.4)
                if metric == "topk":
                    ax.axhline(top_k / n_train, color="0.5", lw=0.8, ls=":",
                               label=f"random scores (top-{top_k} of {n_train})")
                ax.set_xscale("log")
                ax.set_xticks(ratios, [f"{r:g}x" for r in ratios])
                ax.minorticks_off()
                what = "damped Fisher" if curv == "fisher" else "gradient dot products"
                ax.set_xlabel("compression ratio d / k (all methods at the same k)")
                ax.set_ylabel("Spearman with the uncompressed scores" if metric == "spearman"
                              else f"top-{top_k} overlap (most helpful)")
                ax.set_title(f"{corpus}, {what}", fontsize=10)
                ax.grid(alpha=0.3, lw=0.5)
    handles, labels = axes[0, 1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, -0.06 / len(corpora)))
    fig.suptitle("Agreement of compressed influence scores with the uncompressed ones\n"
                 "(scores: positive = helpful; mean ± sd over compressor draws; PCA is fitted "
                 "on the training gradients)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_removal(rem: pd.DataFrame):
    """Change in the targets' and the other test documents' mean loss after removing each
    method's most helpful documents (mean ± sd over fine-tuning seeds), random removal in grey."""
    import matplotlib.pyplot as plt

    corpora = list(dict.fromkeys(rem["corpus"]))
    fig, axes = plt.subplots(1, len(corpora), figsize=(9 * len(corpora), 4), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        g = rem[rem["corpus"] == corpus]
        methods = list(dict.fromkeys(g["method"]))
        x = np.arange(len(methods))
        for off, col, which, hatch in ((-0.2, "target_loss_change", "target test documents", ""),
                                       (0.2, "other_loss_change", "other test documents", "//")):
            stats = g.groupby("method", sort=False)[col].agg(["mean", "std"]).loc[methods]
            ax.bar(x + off, stats["mean"], 0.38, yerr=stats["std"].fillna(0), capsize=3,
                   color=[color(m) for m in methods], alpha=1.0 if not hatch else 0.45,
                   hatch=hatch, edgecolor="k", lw=0.5, label=which)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(x, [label(m).replace(" (", "\n(") for m in methods], fontsize=7,
                      rotation=20)
        ax.set_ylabel("change in mean loss after removal (nats / token)\n"
                      "positive: the removed documents were helpful")
        n = int(g["n_removed"].iloc[0])
        ax.set_title(f"{corpus}: remove the {n} most helpful training documents, re-fine-tune "
                     f"(sd over {g['seed'].nunique()} seeds)", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_coherence(values: dict[str, np.ndarray], stats: dict[str, dict[str, Any]]):
    """Histogram of test-train pair coherence per corpus, with the coherence above which a
    fixed mask has more variance than a Gaussian projection of the same k (cosine 0)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(values), figsize=(6 * len(values), 3.8), squeeze=False)
    for ax, (corpus, v) in zip(axes[0], values.items()):
        bins = np.geomspace(max(float(v.min()), 1e-2), float(v.max()) * 1.01, 50)
        ax.hist(v, bins=bins, color="0.7")
        for i, (key, b) in enumerate(stats[corpus]["by_ratio"].items()):
            if b["crossover_at_cos0"] is None:
                continue
            ax.axvline(b["crossover_at_cos0"], color=plt.cm.viridis(i / max(len(
                stats[corpus]["by_ratio"]) - 1, 1)), ls="--",
                label=f"{key}: mask wins below {b['crossover_at_cos0']:.2f} "
                      f"({100 * b['mask_wins']:.0f}% of pairs)")
        ax.set_xscale("log")
        ax.set(xlabel="coherence d·Σa²b² / (|a|²|b|²) of a test-train gradient pair",
               ylabel="pairs", title=f"{corpus}: d = {stats[corpus]['d']:,}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
