"""Notebook 06's computation (:func:`run`): the fine-tuned LM and its exact gradients, every
method's agreement with the uncompressed scores, the coherence of gradient pairs, removal and
re-fine-tuning, and the cost table. Tables and arrays only: no prose, no figures, no files."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .... import theory as th
from ....blocks import BatchGrads
from ....compressors import Compressor, Identity
from ....curvature import Preconditioner
from ....gradients import gradients
from ....losses import causal_lm
from ....persample import PerSampleGrads
from ....scores import scores as influence_scores
from ....task import Task
from ... import data as dd
from ... import metrics
from ...models import gpt2_ladder, train
from ..common import check_device, rng_for, seed_for, threads
from ..measure import compression_step, time_calls
from ..methods import Match, match, ready, spec
from ..methods import pilot_grads as methods_pilot_grads
from ..theory import crossover_coherence
from .config import CURVATURES, MB, REFERENCE, Config
from .report import quantiles, ratio_key, rounded

COLUMNS = 1 << 20  # pair statistics accumulate over slices of this many gradient columns


# --------------------------------------------------------------------------- model and data


@dataclass
class LM:
    """A fine-tuned causal LM with its documents and exact per-sample gradients.

    ``train`` / ``test``: ``input_ids`` and ``attention_mask``, (n, T). ``base``: the checkpoint
    every fine-tuning starts from. ``model``: ``base`` fine-tuned on all of ``train`` with the
    first fine-tuning seed; ``task`` selects its gradient's parameters. ``G_train`` (n_train, d)
    and ``G_test`` (n_test, d): float32 per-sample gradients of the mean next-token loss (Identity
    compressor); ``test_loss`` (n_test,) that loss per test document. ``pilot``: the full
    per-sample gradients (:class:`~dropinf.BatchGrads`) of the pilot documents that importance
    dropout is fitted on (:func:`pilot_grads`, computed on first use), ``pilot_s`` the seconds
    that took.
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
    pilot: list[BatchGrads] | None = field(default=None, repr=False)
    pilot_s: float = math.nan

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


def pilot_docs(cfg: Config) -> np.ndarray:
    """The ``n_pilot`` training documents importance dropout is fitted on: one seeded draw
    (sorted), the same for every method, ratio and draw; training data only."""
    return np.sort(rng_for(cfg.seed, "pilot").permutation(cfg.n_train)[: cfg.n_pilot])


def pilot_grads(cfg: Config, lm: LM) -> list[BatchGrads]:
    """The full per-sample gradients of the pilot documents (:func:`pilot_docs`), in batches of
    ``grad_batch``: computed once per LM and kept in ``lm.pilot``, so that every importance mask
    is fitted from them (:meth:`dropinf.Dropout.fit_grads`) without a new backward pass."""
    if lm.pilot is None:
        idx = torch.as_tensor(pilot_docs(cfg), dtype=torch.long)
        docs = {k: v[idx] for k, v in lm.train.items()}
        t0 = time.perf_counter()
        lm.pilot = methods_pilot_grads(lm.task, dd.tensor_loader(docs, batch_size=cfg.grad_batch))
        lm.pilot_s = time.perf_counter() - t0
    return lm.pilot


def compressed(lm: LM, comp: Compressor, batch: int) -> tuple[Tensor, Tensor]:
    """(n_train, k) and (n_test, k) float32 gradients of ``lm`` compressed by ``comp``."""
    return tuple(gradients(lm.task, lm.loader(s, batch), comp, progress=False).data
                 for s in ("train", "test"))


# --------------------------------------------------------------------------- methods


def method_compressor(method: str, m: Match, seed: int, cfg: Config
                      ) -> tuple[Compressor | None, str]:
    """The unbound compressor of ``method`` at the matched setting ``m``, or None and why not:
    a fitted method (PCA, fitted on the ``n_train`` training gradients by :func:`fitted`) where k
    exceeds them, another whose stored map exceeds ``dense_max_mb``. Importance dropout is
    fitted on the pilot set by :func:`fitted`."""
    s, opts = spec(method), {"pca_n_fit": cfg.n_train, "oversample": cfg.oversample}
    if s.needs_fit:
        if m.k > cfg.n_train:
            return None, f"does not fit: k={m.k} directions from {cfg.n_train} training gradients"
    elif (need := s.stored_bytes(m, **opts)) > cfg.dense_max_mb * MB:
        return None, (f"does not fit: its map needs {need / MB:,.0f} MB > "
                      f"dense_max_mb={cfg.dense_max_mb:g}")
    return s.compressor(m, seed, **opts), "ok"


def fitted(cfg: Config, lm: LM, method: str, comp: Compressor, k: int) -> Compressor:
    """``comp`` (``method``'s, from :func:`method_compressor`) fitted where it needs it and
    bound, with dimension k checked (:func:`~..methods.ready`): PCA on ``lm.G_train``,
    importance dropout on the pilot gradients (:func:`pilot_grads`)."""
    pilot = pilot_grads(cfg, lm) if spec(method).pilot else None
    return ready(comp, lm.task, k, lm.G_train, pilot=pilot)


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
        comp = fitted(cfg, lm, method, comp, k)
        t0 = time.perf_counter()
        Gtr, Gte = compressed(lm, comp, cfg.grad_batch)
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
    stats: dict[str, Any] = {"d": lm.d, "n_pairs": int(ok.sum()), **quantiles(values)}
    by_ratio = {}
    for ratio in cfg.ratios:
        k = match(lm.task, ratio=ratio).k
        vm = th.variance(st, "fixed", k)[ok]
        vg = th.variance(st, "gaussian", k)[ok]
        by_ratio[ratio_key(ratio)] = {
            "k": k, "mask_wins": rounded(float(np.mean(vm < vg))),
            "variance_ratio_median": rounded(float(np.median(vm / vg))),
            "crossover_at_cos0": (None if k >= lm.d  # a mask that keeps everything is exact
                                  else rounded(crossover_coherence(lm.d, 1.0 - k / lm.d, 0.0))),
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
                     **quantiles(sl.coherence[good])})
    meds = [r["median"] for r in rows if r["median"] is not None]
    stats["layer_median_range"] = [min(meds), max(meds)] if meds else None
    return stats, pd.DataFrame(rows), values


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



# --------------------------------------------------------------------------- cost


def cost_table(cfg: Config, lm: LM, progress: bool = True) -> pd.DataFrame:
    """Per method and ratio (first draw): the compression step on one batch of ``grad_batch``
    training documents (median ms over ``timing_repeats`` calls after one warm-up, from the fully
    captured layer factors to the (B, k) output, :func:`~.measure.compression_step`), the map
    bytes it must store, and the fit in seconds (``fit_s``: PCA on the training gradients;
    importance dropout on the pilot gradients, whose backward pass, shared by every importance
    mask, is ``pilot_s``). Times vary between runs: they belong in tables, not in the summary."""
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
            if spec(method).pilot:
                pilot_grads(cfg, lm)  # its one backward pass is pilot_s, not this fit's
            t0 = time.perf_counter()
            comp = fitted(cfg, lm, method, comp, k)
            fits = spec(method).needs_fit or spec(method).pilot
            fit_s = time.perf_counter() - t0 if fits else 0.0
            row = _cost_row(cfg, lm, method, comp, k, bg, fit_s, ratio)
            rows.append({**row, "pilot_s": lm.pilot_s} if spec(method).pilot else row)
    return pd.DataFrame(rows)


def _cost_row(cfg: Config, lm: LM, method: str, comp: Compressor, k: int, bg, fit_s: float,
              ratio: float) -> dict[str, Any]:
    step = compression_step(comp.bind(lm.task), bg)
    t = time_calls(step, torch.device(cfg.device), 1, cfg.timing_repeats)
    return {"corpus": lm.corpus, "method": method, "ratio": ratio, "k": k, "status": "ok",
            "batch": bg.size, "compress_ms": 1e3 * t.median, "compress_ms_min": 1e3 * t.min,
            "calls": t.calls, "map_bytes": comp.map_bytes, "fit_s": fit_s,
            "threads": torch.get_num_threads()}




# --------------------------------------------------------------------------- the run


@dataclass
class Result:
    """Everything notebook 06 shows, computed by :func:`run`.

    ``lms``: corpus -> :class:`LM`; ``agreement_draws``: the rows of :func:`agreement` of every
    corpus, ``agreement``: their :func:`aggregate`; ``scores``: corpus -> method -> Fisher
    scores kept for removal; ``coherence``: corpus -> the stats of :func:`coherence`,
    ``coherence_values``: corpus -> every pair's coherence, ``coherence_by_layer`` and
    ``coherence_ratios`` (its ``by_ratio`` stats as rows) tables; ``removal`` and ``cost``: the
    tables of :func:`removal` and :func:`cost_table`, every corpus; ``seconds``: wall time of
    each stage (for display; never in the summary).
    """

    cfg: Config
    lms: dict[str, LM]
    agreement_draws: pd.DataFrame
    agreement: pd.DataFrame
    scores: dict[str, dict[str, Tensor]]
    coherence: dict[str, dict[str, Any]]
    coherence_values: dict[str, np.ndarray]
    coherence_by_layer: pd.DataFrame
    coherence_ratios: pd.DataFrame
    removal: pd.DataFrame
    cost: pd.DataFrame
    seconds: dict[str, float] = field(default_factory=dict)


# Result field -> file name under tables/ (the notebook saves each with ``run.table``).
TABLES = {"agreement_draws": "agreement_draws", "agreement": "agreement",
          "coherence_by_layer": "coherence_by_layer", "coherence_ratios": "coherence",
          "removal": "removal", "cost": "cost"}


def run(cfg: Config, progress: bool = True) -> Result:
    """Notebook 06's computation, corpus by corpus: :func:`prepare`, :func:`agreement`,
    :func:`coherence`, :func:`removal` and :func:`cost_table`, with torch's CPU threads set to
    ``cfg.threads``."""
    check_device(cfg.device)
    with threads(cfg.threads):
        return _run(cfg, progress)


def _run(cfg: Config, progress: bool) -> Result:
    lms, scores, coh, values, seconds = {}, {}, {}, {}, {}
    draws, layers, removals, costs = [], [], [], []

    def timed(stage: str, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - t0
        return out

    for name in cfg.corpora:
        lm = lms[name] = timed("prepare", prepare, cfg, name, progress)
        ag = timed("agreement", agreement, cfg, lm, progress)
        scores[name] = ag.scores
        draws.append(ag.table)
        coh[name], by_layer, values[name] = timed("coherence", coherence, cfg, lm)
        layers.append(by_layer)
        removals.append(timed("removal", removal, cfg, lm, ag.scores, progress))
        costs.append(timed("cost", cost_table, cfg, lm, progress))
    table = pd.concat(draws, ignore_index=True)
    return Result(
        cfg, lms, table, aggregate(table), scores, coh, values,
        pd.concat(layers, ignore_index=True),
        pd.DataFrame([{"corpus": n, "ratio": k, **v} for n, c in coh.items()
                      for k, v in c["by_ratio"].items()]),
        pd.concat(removals, ignore_index=True), pd.concat(costs, ignore_index=True), seconds)
