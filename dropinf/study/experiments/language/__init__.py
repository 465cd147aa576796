"""Notebook 06 (language): influence of training documents on a causal language model.

The experiment's parts: :mod:`.config` (``Config``, ``PROFILES``), :mod:`.run` (``run(cfg) ->
Result``, computation only), :mod:`.report` (``summary(result)`` with its conclusion, the
displayed tables) and :mod:`.plots` (figures from a ``Result``); their public names are
re-exported here.

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
- the composed methods (family ``composed`` of :data:`~..methods.METHODS`), beyond the paper
  (DESIGN section 6): a flat dropout mask to ``oversample * k`` coordinates followed by an SJLT
  down to k, one :class:`dropinf.Chain`;
- importance dropout (issue 15; the methods with ``pilot`` in the method table: flat,
  factored, and importance-then-SJLT), fitted on a seeded pilot set of ``n_pilot`` training
  documents (:func:`pilot_docs`), and the issue's targets against the dense Gaussian
  (:func:`importance_targets`).

Sign convention: positive score = helpful (removing the document raises the test loss). Every
random choice comes from ``cfg.seed`` through named streams (:func:`~.common.seed_for`).
"""

from .config import CORPORA, CURVATURES, MB, METHODS, PROFILES, REFERENCE, Config
from .plots import plot_agreement, plot_coherence, plot_removal
from .report import (
    SECTION6,
    TARGET_REFERENCE,
    TARGETS,
    agreement_at,
    agreement_pivot,
    coherence_text,
    conclude,
    corpus_summary,
    corpus_text,
    cost_display,
    cost_text,
    importance_targets,
    removal_means,
    removal_summary,
    rounded,
    skipped_text,
    summary,
    targets_table,
)
from .run import (
    LM,
    TABLES,
    Agreement,
    Result,
    aggregate,
    agreement,
    agreement_row,
    base_model,
    coherence,
    compressed,
    cost_table,
    doc_losses,
    fine_tune,
    finetune_seeds,
    fisher_scores,
    fitted,
    gradient_params,
    load_corpus,
    method_compressor,
    most_helpful,
    pilot_docs,
    pilot_grads,
    prepare,
    random_set,
    removal,
    removal_sets,
    run,
    targets,
)

__all__ = [
    "CORPORA", "CURVATURES", "LM", "MB", "METHODS", "PROFILES", "REFERENCE", "SECTION6",
    "TABLES", "TARGET_REFERENCE", "TARGETS", "aggregate", "agreement", "Agreement",
    "agreement_at", "agreement_pivot", "agreement_row", "base_model", "coherence",
    "coherence_text", "compressed", "conclude", "Config", "corpus_summary", "corpus_text",
    "cost_display", "cost_table", "cost_text", "doc_losses", "fine_tune", "finetune_seeds",
    "fisher_scores", "fitted", "gradient_params", "importance_targets", "load_corpus",
    "method_compressor", "most_helpful", "pilot_docs", "pilot_grads", "plot_agreement",
    "plot_coherence", "plot_removal", "prepare", "random_set", "removal", "removal_means",
    "removal_sets", "removal_summary", "Result", "rounded", "run", "skipped_text", "summary",
    "targets", "targets_table",
]
