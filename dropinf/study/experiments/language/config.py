"""Notebook 06's configuration: :class:`Config` (every knob, validated) and its :data:`PROFILES`."""

from __future__ import annotations

from dataclasses import dataclass

from ... import data as dd
from ...models import GPT2_LADDER
from ..common import Profiled, check_int, check_names, float_list
from ..methods import IDENTITY, compressors

REFERENCE = IDENTITY
METHODS = compressors()
CURVATURES = ("fisher", "dot")
CORPORA = ("stdlib", *dd.WEBTEXT)
MB = 2**20


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
    A composed method keeps ``oversample * k`` coordinates before its SJLT. Importance
    dropout (the methods of :data:`~..methods.METHODS` with ``pilot``) is fitted on a pilot set:
    ``n_pilot`` training documents drawn once from the seed (training data only, never test
    documents).

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
    n_pilot: int = 64
    n_targets: int = 8
    remove_fraction: float = 0.1
    removal_ratio: float = 16.0
    removal_methods: tuple[str, ...] = (
        REFERENCE, "dropout", "dropout_factored", "gaussian_factored", "sjlt",
        "dropout_imp_sjlt",
    )  # fmt: skip  (data: which methods this profile re-fine-tunes for; the last: the best
    #   importance variant with Fisher scores at 16x and 64x in the cpu-quick run)
    n_retrain_seeds: int = 3
    timing_repeats: int = 5
    threads: int = 1
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_names(self, "corpora", CORPORA)
        check_names(self, "methods", compressors())
        for name in ("removal_methods", "packages", "layers"):
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
                          ("top_k", 1), ("oversample", 1), ("n_pilot", 1), ("n_targets", 1),
                          ("n_retrain_seeds", 1), ("timing_repeats", 1), ("threads", 0)):
            check_int(self, name, low)
        for name in ("pretrain_lr", "lr", "damping", "dense_max_mb"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0):
                raise ValueError(f"{name}={v!r} must be a number > 0")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay={self.weight_decay!r} must be a number >= 0")
        if self.n_pilot > self.n_train:
            raise ValueError(f"n_pilot={self.n_pilot} exceeds n_train={self.n_train}: the pilot "
                             "set is a subset of the training documents")
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
# The gpu profile's code paths (a pretrained GPT-2 on web text) at toy size on the CPU, for
# the test suite (no results); pretrained must name a local two-block GPT-2 directory (the test
# writes one), whose last block is transformer.h.1.
PROFILES["gpu-smoke"] = {
    **PROFILES["gpu"], "layers": ("transformer.h.1",), "seq_len": 8, "n_train": 16, "n_test": 4,
    "epochs": 1, "batch_size": 8, "grad_batch": 8, "ratios": (16.0, 64.0), "n_mask_seeds": 2,
    "top_k": 4, "n_targets": 2, "n_retrain_seeds": 2, "n_pilot": 8, "removal_ratio": 16.0,
    "timing_repeats": 1, "dense_max_mb": 64.0, "device": "cpu", "threads": 1,
}

