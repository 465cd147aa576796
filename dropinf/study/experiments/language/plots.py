"""Notebook 06's figures, each from a :class:`~.run.Result`."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..methods import color, label, spec
from .config import CURVATURES

if TYPE_CHECKING:
    from .run import Result


def plot_agreement(res: Result):
    """Spearman and top-k overlap with the uncompressed scores against the compression ratio
    (mean ± sd over draws): two rows of panels per corpus (damped Fisher, dot products), columns
    Spearman and top-k overlap; one legend below."""
    import matplotlib.pyplot as plt

    agg, top_k, n_train = res.agreement, res.cfg.top_k, res.cfg.n_train
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


def plot_removal(res: Result):
    """Change in the targets' and the other test documents' mean loss after removing each
    method's most helpful documents (mean ± sd over fine-tuning seeds), random removal in grey."""
    import matplotlib.pyplot as plt

    rem = res.removal
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


def plot_coherence(res: Result):
    """Histogram of test-train pair coherence per corpus, with the coherence above which a
    fixed mask has more variance than a Gaussian projection of the same k (cosine 0)."""
    import matplotlib.pyplot as plt

    values, stats = res.coherence_values, res.coherence
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
