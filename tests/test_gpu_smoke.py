"""The ``gpu`` profile's code paths, run on the CPU at toy size (the ``gpu-smoke`` profile).

No accelerator and no network here: the test writes synthetic stand-ins in the real data's
formats under a temporary ``$DROPINF_DATA`` (CIFAR-10 pickle batches, GLUE TSV files, web-text
JSON lines) and two-layer, randomly initialised GPT-2 and BERT models with small word-level
tokenizers into local directories that ``data.pretrained`` reads like a hub id. Then every
experiment module's ``run`` and ``summary`` execute at ``gpu-smoke``, which is the ``gpu``
profile with sizes shrunk (same data sources, models and branches).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from dropinf.study import data
from dropinf.study.experiments import (
    common,
    cost,
    fidelity,
    language,
    mislabel,
    peers,
    removal,
    theory,
)

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the a cat dog sat ran on under mat log and but big small red blue it was is not "
         "good bad film movie very story said news").split()


def _sentence(rng: np.random.Generator, n: int) -> str:
    return " ".join(rng.choice(WORDS, size=n))


def write_cifar(root, rng: np.random.Generator, n_each: int = 8) -> None:
    """Five training batches and a test batch of ``n_each`` random images each, in the python
    pickle layout (bytes keys, as the real files have)."""
    folder = root / data.CIFAR10_DIR
    folder.mkdir(parents=True)
    for name in data.CIFAR10_FILES:
        batch = {b"data": rng.integers(0, 256, (n_each, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, n_each)]}
        (folder / name).write_bytes(pickle.dumps(batch))


def write_glue(root, rng: np.random.Generator, n_train: int = 32, n_dev: int = 8) -> None:
    """MRPC (``Quality, #1 ID, #2 ID, #1 String, #2 String``) and SST-2 (``sentence, label``)
    train and dev TSV files with balanced random labels."""
    for task, folder in data.GLUE_TASKS.items():
        d = root / "glue" / folder
        d.mkdir(parents=True)
        for split, n in (("train", n_train), ("dev", n_dev)):
            labels = np.arange(n) % 2
            if task == "mrpc":
                rows = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
                rows += [f"{y}\t{i}\t{i + 1000}\t{_sentence(rng, 6)}\t{_sentence(rng, 5)}"
                         for i, y in enumerate(labels)]
            else:
                rows = ["sentence\tlabel"] + [f"{_sentence(rng, 7)}\t{y}" for y in labels]
            (d / f"{split}.tsv").write_text("\n".join(rows) + "\n", encoding="utf-8")


def write_webtext(root, rng: np.random.Generator, n_docs: int = 24) -> None:
    """Both web-text corpora as JSON lines of ``{"text": ...}``."""
    d = root / "webtext"
    d.mkdir(parents=True)
    for name in data.WEBTEXT:
        lines = [json.dumps({"text": _sentence(rng, 12)}) for _ in range(n_docs)]
        (d / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def word_tokenizer(bert: bool):
    """A word-level fast tokenizer over :data:`WORDS`: BERT's special tokens and
    ``[CLS] a [SEP] (b [SEP])`` with token type ids, or GPT-2's single end-of-text token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if bert else ["<|endoftext|>"]
    vocab = {w: i for i, w in enumerate([*special, *WORDS])}
    unk = "[UNK]" if bert else "<|endoftext|>"
    tok = Tokenizer(models.WordLevel(vocab, unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if not bert:
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=unk, eos_token=unk,
                                       unk_token=unk)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def write_models(root) -> dict[str, str]:
    """Two-layer GPT-2 and BERT (random weights from fixed seeds) with their tokenizers, saved
    with ``save_pretrained``; returns ``{"gpt2": dir, "bert-base-uncased": dir}``."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    out = {}
    for name, bert in (("gpt2", False), ("bert-base-uncased", True)):
        tok = word_tokenizer(bert)
        torch.manual_seed(0)
        if bert:
            model = BertModel(BertConfig(vocab_size=len(tok), hidden_size=16,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=32, max_position_embeddings=64))
        else:
            model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=16, n_layer=2,
                                               n_head=2, n_positions=64, bos_token_id=0,
                                               eos_token_id=0))
        path = root / name
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[name] = str(path)
    return out


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """``$DROPINF_DATA`` holding the synthetic data sets, and the model directories."""
    root = tmp_path_factory.mktemp("gpu-smoke")
    rng = np.random.default_rng(0)
    write_cifar(root, rng)
    write_glue(root, rng)
    write_webtext(root, rng)
    dirs = write_models(root / "models")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DROPINF_DATA", str(root))
        with common.threads(1):
            yield dirs


def run_notebook(stem: str, out_dir: Path, **config) -> dict:
    """Execute the code cells of ``notebooks/<stem>.ipynb`` in this process (no kernel to start)
    with ``profile = "gpu-smoke"`` and ``config`` set after its parameters cell, as papermill
    would; returns the summary.json it wrote."""
    nb = json.loads((ROOT / "notebooks" / f"{stem}.ipynb").read_text(encoding="utf-8"))
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    ns: dict = {}
    exec(cells[0], ns)  # the parameters cell
    ns.update(profile="gpu-smoke", out_dir=str(out_dir), config=config)
    try:
        for i, src in enumerate(cells[1:], start=1):
            exec(compile(src, f"{stem}.ipynb cell {i}", "exec"), ns)
    finally:
        plt.close("all")
    s = json.loads((out_dir / "summary.json").read_text())
    assert isinstance(s["conclusion"], str) and s["conclusion"]
    assert json.loads((out_dir / "manifest.json").read_text())["profile"] == "gpu-smoke"
    assert list((out_dir / "figures").glob("*.png")), "the notebook drew no figure"
    return s


@pytest.mark.parametrize("stem, module", [("01_theory", theory), ("02_fidelity", fidelity),
                                          ("03_cost", cost), ("05_removal", removal),
                                          ("07_peers", peers)])
def test_gpu_branch_runs_at_toy_size(smoke, tmp_path, stem, module):
    """Each notebook at gpu-smoke (ResNet-9 on the CIFAR-10 files for 02 and 05) on the CPU."""
    cfg = module.Config.for_profile("gpu-smoke")
    gpu = module.PROFILES["gpu"]
    for name in ("models", "dataset", "methods", "lm_model"):
        if name in gpu:
            assert getattr(cfg, name) == gpu[name], name  # the gpu paths, not cpu-quick's
    run_notebook(stem, tmp_path)


def test_gpu_branch_bert_on_glue(smoke, tmp_path):
    """Notebook 04's gpu branch: a two-layer BERT tail on GLUE MRPC and SST-2."""
    assert mislabel.PROFILES["gpu-smoke"]["datasets"] == ("mrpc", "sst2")
    s = run_notebook("04_mislabel", tmp_path, text_model=smoke["bert-base-uncased"])
    assert "GLUE MRPC" in s["conclusion"] and "GLUE SST-2" in s["conclusion"]


def test_gpu_branch_pretrained_gpt2_on_web_text(smoke, tmp_path):
    """Notebook 06's gpu branch: a pretrained two-block GPT-2 fine-tuned on both web-text sets,
    influence over its last block."""
    assert language.PROFILES["gpu-smoke"]["corpora"] == ("openwebtext", "cnn_dailymail")
    s = run_notebook("06_language", tmp_path, pretrained=smoke["gpt2"])
    assert "openwebtext" in s["conclusion"] and "cnn_dailymail" in s["conclusion"]


@pytest.mark.parametrize("module", [cost, removal, language, mislabel],
                         ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_cuda_without_a_device_fails_fast_naming_the_fix(module, tmp_path, monkeypatch):
    """Without CUDA, the gpu profile's device="cuda" raises before any data is read (the data
    root is empty) or model built, naming ``-p device cpu`` and the gpu-smoke profile."""
    monkeypatch.setenv("DROPINF_DATA", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as here, also on a GPU
    cfg = module.Config.for_profile("gpu", device="cuda")
    with pytest.raises(ValueError, match=r"device='cuda'.*-p device cpu.*gpu-smoke"):
        module.run(cfg)
