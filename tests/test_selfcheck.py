"""Per-sample gradients are exact or refused: models and losses the hook path does not see
whole, each against a per-sample autograd loop, in float32 and under a float64 default dtype."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import loop_grads
from torch import nn

import dropinf as di
from dropinf import persample
from dropinf.blocks import BatchGrads, DenseGrad
from dropinf.plan import make_plan


def ce(model, b):
    return F.cross_entropy(model(b[0]), b[1], reduction="none")


def l2_in_loss(model, b):  # the regulariser stated inside the loss, on every parameter
    return ce(model, b) + 0.05 * sum((p**2).sum() for p in model.parameters())


def mlp():
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))


class TiedHead(nn.Module):
    """nanoGPT/Llama style: the output head is F.linear on the embedding's weight."""

    def __init__(self, V=11, D=6):
        super().__init__()
        self.wte, self.fc = nn.Embedding(V, D), nn.Linear(D, D)

    def forward(self, ids):
        return F.linear(torch.tanh(self.fc(self.wte(ids))), self.wte.weight)


def next_token(model, b):
    ids = b[0]
    logits = model(ids)
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none").mean(1)


class LinearAlsoFunctional(nn.Module):
    """A hooked Linear whose weight is also used by F.linear elsewhere in forward."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)) + F.linear(x, self.a.weight))


class TwiceInOneModule(nn.Module):
    """A custom module that uses its weight twice in one forward."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(5, 5) / 3)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(x @ self.w.T) @ self.w.T)


class BufferOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.linspace(-1, 1, 5))

    def forward(self, x):
        return x - self.shift


class NoGradForPart(nn.Module):
    """Part of the batch goes through the layer under torch.no_grad: the loss of a sample then
    depends on its position in the batch, so no per-sample gradient exists."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 3)

    def forward(self, x):
        with torch.no_grad():
            head = self.a(x[:2])
        return torch.cat([head, self.a(x[2:])])


class SequenceFirst(nn.Module):
    """nn.TransformerEncoderLayer with its default batch_first=False, fed (T, B, D) with T == B:
    the hooked linears see the sequence along dimension 0."""

    def __init__(self):
        super().__init__()
        self.t = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0)
        self.h = nn.Linear(4, 3)

    def forward(self, x):
        return self.h(self.t(x.transpose(0, 1)).transpose(0, 1).mean(1))


class Unsqueezed(nn.Module):
    """A hooked layer called on x.unsqueeze(0): shape (1, B, D)."""

    def __init__(self):
        super().__init__()
        self.a, self.h = nn.Linear(5, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.h(torch.tanh(self.a(x.unsqueeze(0)).squeeze(0)))


class WithNorm(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.bn, self.h = nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)
        self.scale = nn.Parameter(torch.tensor(1.5))
        self.bn.running_mean.uniform_(-0.5, 0.5)

    def forward(self, x):
        return self.h(self.bn(self.lin(x)))


def calls_submodules(model, b):  # the loss calls submodules and reads model.scale
    logits = model.scale * model.h(model.bn(model.lin(b[0])))
    return F.cross_entropy(logits, b[1], reduction="none")


def indexes_sequential(model, b):
    return F.cross_entropy(model[2](torch.tanh(model[0](b[0]))), b[1], reduction="none")


def with_buffer_only():
    return nn.Sequential(BufferOnly(), nn.Linear(5, 3))


# name -> (model factory, loss, batch kind, expected: "exact" or the start of the error)
CASES = {
    "l2_in_loss": (mlp, l2_in_loss, "vec", "exact"),
    "tied_functional_head": (TiedHead, next_token, "ids", "exact"),
    "linear_weight_also_functional": (LinearAlsoFunctional, ce, "vec", "exact"),
    "parameter_twice_in_one_forward": (TwiceInOneModule, ce, "vec", "exact"),
    "buffer_only_module": (with_buffer_only, ce, "vec", "exact"),
    "no_grad_for_part_of_the_batch": (NoGradForPart, ce, "vec", "per-sample gradients failed"),
    "sequence_first_with_T_equal_B": (SequenceFirst, ce, "seq", "exact"),
    "input_unsqueezed": (Unsqueezed, ce, "vec", "exact"),
    "loss_calls_submodules": (WithNorm, calls_submodules, "vec", "exact"),
    "loss_indexes_sequential": (mlp, indexes_sequential, "vec", "exact"),
}
B = 6


def make_batch(kind: str):
    g = torch.Generator().manual_seed(1)
    y = torch.randint(0, 3, (B,), generator=g)
    if kind == "ids":
        return (torch.randint(0, 11, (B, 7), generator=g),)
    if kind == "seq":  # sequence length T == B
        return (torch.randn(B, B, 4, generator=g).to(torch.get_default_dtype()), y)
    return (torch.randn(B, 5, generator=g).to(torch.get_default_dtype()), y)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64-default"])
def default_dtype(request):
    old = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(old)


def _tolerance(dtype: torch.dtype) -> float:
    # max error relative to the largest gradient: a few hundred roundings of the dtype
    return 256 * torch.finfo(dtype).eps


@pytest.mark.parametrize("name", list(CASES))
def test_exact_or_refused_against_a_per_sample_loop(name, default_dtype):
    factory, loss, kind, expected = CASES[name]
    torch.manual_seed(0)
    model = factory().eval()
    batch = make_batch(kind)
    task = di.Task(model, loss)
    run = lambda: di.gradients(task, [batch], di.Identity(), progress=False, dtype=default_dtype)  # noqa: E731
    if expected != "exact":
        with pytest.raises(ValueError, match=expected):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                run()
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        G = run()
    assert G.data.dtype == default_dtype
    samples = [tuple(t[i : i + 1] for t in batch) for i in range(B)]
    ref = loop_grads(model, loss, samples, task.param_names)
    err = float((G.data - ref).abs().max() / ref.abs().max())
    assert err < _tolerance(default_dtype), err


def test_rerouted_parameters_are_named_with_the_reason():
    task = di.Task(mlp().eval(), l2_in_loss)
    with pytest.warns(UserWarning, match=r"0\.weight .*parallel to the parameter itself.*l2="):
        di.gradients(task, [make_batch("vec")], di.Identity(), progress=False)
    task = di.Task(TiedHead().eval(), next_token)
    with pytest.warns(UserWarning, match=r"wte\.weight .*used outside its module"):
        di.gradients(task, [make_batch("ids")], di.Identity(), progress=False)
    task = di.Task(Unsqueezed().eval(), ce)
    with pytest.warns(UserWarning, match=r"module 'a' got input of shape \(1, 6, 5\)"):
        di.gradients(task, [make_batch("vec")], di.Identity(), progress=False)


def test_check_false_skips_the_check():
    """Documented: without the check a missed use is not found (here the L2 term)."""
    task = di.Task(mlp().eval(), l2_in_loss)
    batch = make_batch("vec")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no reroute warning
        G = di.gradients(task, [batch], di.Identity(), progress=False, check=False)
    samples = [tuple(t[i : i + 1] for t in batch) for i in range(B)]
    ref = loop_grads(task.model, l2_in_loss, samples, task.param_names)
    assert float((G.data - ref).abs().max() / ref.abs().max()) > 1e-3


@pytest.mark.parametrize(
    "spec",
    [
        ("dropout", {"p": 0.5, "factored": True, "seed": 1}),
        ("dropout", {"p": 0.5, "factored": True, "seed": 1, "block": 2}),
        ("dropout", {"p": 0.5, "seed": 1}),
        ("gaussian", {"p": 0.5, "factored": True}),
        ("gaussian", {"k": 8}),
        ("sjlt", {"k": 8}),
    ],
    ids=str,
)
@pytest.mark.parametrize("name", ["tied_functional_head", "linear_weight_also_functional"])
def test_compressors_on_rerouted_layers_compress_the_exact_gradients(name, spec):
    """A factored layer whose weight the check sent to torch.func is compressed from its dense
    per-sample gradient: the result equals compressing the exact gradients."""
    comp = di.make(spec[0], **spec[1])
    factory, loss, kind, _ = CASES[name]
    task = di.Task(factory().eval(), loss)
    batch = make_batch(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        G = di.gradients(task, [batch], di.Identity(), progress=False).data
        Z = di.gradients(task, [batch], comp, progress=False).data
    dense = [DenseGrad(q.name, G[:, q.offset : q.stop]) for q in task.params]
    exact = BatchGrads(task.params, dense, B)
    want = comp.compress(exact)
    torch.testing.assert_close(Z, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()))
    if isinstance(comp, di.Dropout):
        idx, scale = comp.kept_indices()
        torch.testing.assert_close(want, G[:, idx] * scale, rtol=0, atol=0)


def test_check_catches_samples_swapped_in_the_hook_path(monkeypatch):
    """A planted bug that moves each sample's output gradient to the next sample: the plain sum
    over the batch is unchanged, the randomly weighted sum is not, so the check finds it."""
    real = persample._Tap.backward

    def rolled(ctx, g):
        ctx.sink.append(g.roll(1, 0) if ctx.record is None else ctx.record(g.roll(1, 0)))
        return g, None, None, None

    monkeypatch.setattr(persample._Tap, "backward", staticmethod(rolled))
    model = mlp().eval()
    task = di.Task(model, ce)
    batch = make_batch("vec")
    with pytest.warns(UserWarning, match="self-check"):
        G = di.gradients(task, [batch], di.Identity(), progress=False)
    monkeypatch.setattr(persample._Tap, "backward", staticmethod(real))
    samples = [tuple(t[i : i + 1] for t in batch) for i in range(B)]
    ref = loop_grads(model, ce, samples, task.param_names)
    assert float((G.data - ref).abs().max() / ref.abs().max()) < 1e-5  # rerouted: exact again


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tolerance_follows_the_dtype(monkeypatch, dtype):
    """An error of relative size 1e-5 planted in the hook path: above float64's sqrt(eps)
    (1.5e-8), below float32's (3.5e-4)."""
    def off(ctx, g):  # records a slightly wrong output gradient, passes the right one on
        ctx.sink.append(g * (1 + 1e-5))
        return g, None, None, None

    monkeypatch.setattr(persample._Tap, "backward", staticmethod(off))
    task = di.Task(mlp().to(dtype).eval(), ce)
    x, y = make_batch("vec")
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        di.gradients(task, [(x.to(dtype), y)], di.Identity(), progress=False)
    flagged = any("self-check" in str(w.message) for w in seen)
    assert flagged == (dtype == torch.float64)


def test_a_single_sample_first_batch_is_followed_by_a_check_of_two_or_more(monkeypatch):
    """Batch mix-ups need two samples to show: the check runs again on the first batch of two."""
    calls = []
    real = persample.PerSampleGrads._self_check
    monkeypatch.setattr(
        persample.PerSampleGrads,
        "_self_check",
        lambda self, batch, B: calls.append(B) or real(self, batch, B),
    )
    x, y = make_batch("vec")
    batches = [(x[:1], y[:1]), (x[1:2], y[1:2]), (x[2:5], y[2:5]), (x[5:], y[5:])]
    di.gradients(di.Task(mlp().eval(), ce), batches, di.Identity(), progress=False)
    assert calls == [1, 3]


@pytest.mark.parametrize(
    "module, what",
    [
        (nn.GRU(5, 4, batch_first=True), "recurrent kernel"),
        (nn.RNN(5, 4, batch_first=True), "recurrent kernel"),
        (nn.Embedding(10, 5, max_norm=1.0), "max_norm"),
    ],
    ids=["gru", "rnn", "embedding-max-norm"],
)
def test_modules_without_an_exact_path_are_refused_up_front(module, what):
    model = nn.Sequential(module, nn.Linear(5, 3))
    task = di.Task(model, ce)
    with pytest.raises(ValueError, match=rf"module '0' \(\w+\).*{what}.*Task\(params=\.\.\.\)"):
        make_plan(task)
    # leaving it out works
    assert make_plan(di.Task(model, ce, params=["1"])).hooked == {"1": "linear"}


def test_a_batch_encoding_batch_is_accepted():
    from transformers import BatchEncoding

    def loss(model, b):
        return F.cross_entropy(model(b["x"]), b["y"], reduction="none")

    x, y = make_batch("vec")
    task = di.Task(mlp().eval(), loss)
    G = di.gradients(task, [BatchEncoding({"x": x, "y": y})], di.Identity(), progress=False)
    ref = di.gradients(task, [{"x": x, "y": y}], di.Identity(), progress=False)
    torch.testing.assert_close(G.data, ref.data, rtol=0, atol=0)


# ----------------------------------------------------------------------------- fit_exact


def test_fit_exact_with_a_subset_of_trainable_parameters_gives_plain_tensors(tmp_path):
    """Task(params=[...]) a subset while the other parameters still require grad: the fit holds
    no autograd history, so scoring and saving work."""
    torch.manual_seed(0)
    model = mlp().eval()
    task = di.Task(model, ce, params=["2"])
    x, y = make_batch("vec")
    pre = di.Preconditioner.fit_exact(task, [(x, y)], l2=0.5)
    assert not pre.eigvecs.requires_grad and not pre.eigvals.requires_grad
    G = di.gradients(task, [(x, y)], di.Identity(), progress=False)
    S = di.scores(G, G, pre)
    assert not S.requires_grad
    di.Store(tmp_path / "s").save_preconditioner(pre, "exact")
    pre_cg = di.Preconditioner.fit_exact(task, [(x, y)], l2=0.5, solver="cg")
    torch.testing.assert_close(di.scores(G, G, pre_cg), S, rtol=1e-5, atol=1e-6)


def test_fit_exact_l2_per_parameter_enters_the_gradient_norm():
    """At a minimum of the loss plus weight decay on the weight only, the objective's gradient
    norm that fit_exact reports is small; stated as decay on every parameter it is not."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x, y = make_batch("vec")
    x = x.double()
    c = 0.2
    opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=500, tolerance_grad=1e-12,
                            tolerance_change=1e-14, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        obj = ce(model, (x, y)).mean() + c / 2 * (model.weight**2).sum()
        obj.backward()
        return obj

    opt.step(closure)
    task = di.Task(model.eval(), ce)
    right = di.Preconditioner.fit_exact(task, [(x, y)], l2={"weight": c})
    wrong = di.Preconditioner.fit_exact(task, [(x, y)], l2=c)
    obj = ce(model, (x, y)).mean() + c / 2 * (model.weight**2).sum()
    true_norm = float(torch.cat([g.flatten() for g in torch.autograd.grad(obj, [
        model.weight, model.bias])]).norm())
    assert right.info["grad_norm"] == pytest.approx(true_norm, abs=1e-12)
    bias_norm = float(model.bias.detach().norm())
    assert true_norm < 1e-3 * c * bias_norm  # trained to a stationary point of the objective
    assert wrong.info["grad_norm"] == pytest.approx(c * bias_norm, rel=1e-3)
    assert right.info["l2"] == {"weight": c}


def test_fit_exact_l2_names_are_checked():
    task = di.Task(mlp().eval(), ce)
    with pytest.raises(ValueError, match=r"l2 names \['fc.weight'\].*task.param_names"):
        di.Preconditioner.fit_exact(task, [make_batch("vec")], l2={"fc.weight": 1.0})
    with pytest.raises(ValueError, match=r"l2\['0.bias'\]=-1"):
        di.Preconditioner.fit_exact(task, [make_batch("vec")], l2={"0.bias": -1})


def test_fit_exact_refuses_a_loss_that_reads_parameters_behind_its_back():
    """A loss holding its own reference to a parameter (captured before the call) is not seen
    by the functional form; the check compares with autograd and names the parameter."""
    model = mlp().eval()
    held = model[2].weight

    def loss(m, b):
        return ce(m, b) + 0.1 * (held**2).sum()

    task = di.Task(model, loss)
    with pytest.raises(ValueError, match=r"gradient of '2\.weight' .* differs"):
        di.Preconditioner.fit_exact(task, [make_batch("vec")], l2=0.5)
    di.Preconditioner.fit_exact(task, [make_batch("vec")], l2=0.5, check=False)  # the user's call


# ----------------------------------------------------------------------------- review findings


class ShiftBeforeNorm(nn.Module):
    """A scalar shift before LayerNorm: its gradient is 0 in exact arithmetic, so both sides of
    the check are rounding noise (torch.func path); the check must not refuse it."""

    def __init__(self):
        super().__init__()
        self.fc, self.ln, self.out = nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3)
        self.s = nn.Parameter(torch.tensor(0.3))

    def forward(self, x):
        return self.out(self.ln(self.fc(x) + self.s))


class KeyBias(nn.Module):
    """Attention with a separate key bias (a softmax shift: gradient 0 in exact arithmetic)."""

    def __init__(self, D=16):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(D, D), nn.Linear(D, D), nn.Linear(D, D),
                                          nn.Linear(D, 3))
        self.kb = nn.Parameter(torch.randn(D))

    def forward(self, x):
        a = torch.softmax(self.q(x) @ (self.k(x) + self.kb).transpose(1, 2) / 4, -1)
        return self.o((a @ self.v(x)).mean(1))


class KeywordCall(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 3)

    def forward(self, x):
        return self.a(input=x)


class SparseEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.h = nn.Embedding(11, 4, sparse=True), nn.Linear(4, 3)

    def forward(self, ids):
        return self.h(self.e(ids).mean(1))


def _against_loop(model, loss, batch, rel=1e-5):
    task = di.Task(model.eval(), loss)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        G = di.gradients(task, [batch], di.Identity(), progress=False)
    n = len(batch[0])
    ref = loop_grads(model, loss, [tuple(t[i : i + 1] for t in batch) for i in range(n)],
                     task.param_names)
    assert float((G.data - ref).norm() / ref.norm()) < rel
    return [str(w.message) for w in seen]


@pytest.mark.parametrize("factory, shape", [(ShiftBeforeNorm, (32, 8)), (KeyBias, (32, 64, 16))])
def test_parameters_with_a_gradient_that_cancels_are_not_refused(factory, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape)
    y = torch.randint(0, 3, (32,))
    seen = _against_loop(factory(), ce, (x, y))
    assert not any("self-check" in m for m in seen)


def test_a_hooked_layer_called_with_a_keyword_argument():
    x, y = make_batch("vec")
    assert not any("self-check" in m for m in _against_loop(KeywordCall(), ce, (x, y)))


def test_extra_parameters_of_a_hooked_layer_go_through_torch_func_up_front():
    """Old-style weight_norm puts weight_g / weight_v on an nn.Linear: no factored rule."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = nn.Sequential(nn.utils.weight_norm(nn.Linear(5, 4)), nn.Tanh(), nn.Linear(4, 3))
    seen = _against_loop(model, ce, make_batch("vec"))
    assert any("Linear with parameter 'weight_" in m for m in seen)
    assert not any("self-check" in m for m in seen)


def test_sparse_embedding_gradients_are_compared_densely():
    ids = torch.randint(0, 11, (B, 5), generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (B,))
    assert not any("self-check" in m for m in _against_loop(SparseEmbedding(), ce, (ids, y)))


def test_a_bug_in_the_loss_surfaces_as_it_is():
    """An error of the user's loss in a model with a shared (1, T) input is not blamed on the
    per-sample copies of that input."""

    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte, self.wpe, self.h = nn.Embedding(10, 6), nn.Embedding(7, 6), nn.Linear(6, 10)

        def forward(self, ids):
            return self.h(self.wte(ids) + self.wpe(torch.arange(ids.shape[1])[None]))

    def no_mean(model, b):  # forgot to average over tokens: (B, T)
        return F.cross_entropy(model(b[0]).transpose(1, 2), b[0], reduction="none")

    ids = torch.randint(0, 10, (4, 7))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        with pytest.raises(ValueError, match=r"loss returned shape \(4, 7\)"):
            di.gradients(di.Task(Positions(), no_mean), [(ids,)], di.Identity(), progress=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_missed_use_in_a_16_bit_model_is_caught(dtype):
    """In 16 bits the model's own rounding (0.4% for bfloat16) would hide a missed use of a few
    percent; the check runs in float32 and finds it, and the model's parameters come back in
    their own dtype, bit for bit."""

    class Also(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.l2(torch.tanh(self.l1(x)) + 0.05 * F.linear(x, self.l1.weight))

    def loss(m, b):
        return F.cross_entropy(m(b[0]).float(), b[1], reduction="none")

    torch.manual_seed(0)
    model = Also().to(dtype).eval()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(32, 6).to(dtype), torch.randint(0, 3, (32,))
    task = di.Task(model, loss)
    with pytest.warns(UserWarning, match=r"self-check.*l1\.weight"):
        G = di.gradients(task, [(x, y)], di.Identity(), progress=False)
    for n, p in model.named_parameters():
        assert p.dtype == dtype and torch.equal(p, before[n])
    ref = loop_grads(model, loss, [(x[i : i + 1], y[i : i + 1]) for i in range(32)],
                     task.param_names).float()
    # the loop and torch.func both run in 16 bits: agreement to a few of its roundings
    assert float((G.data - ref).norm() / ref.norm()) < 8 * torch.finfo(dtype).eps


def test_l2_coefficients_accept_numpy_and_0d_tensors():
    import numpy as np

    task = di.Task(mlp(), ce)
    a = task.l2_vector({"0.weight": np.float32(0.25), "2.bias": torch.tensor(0.5)})
    assert a[:20].eq(0.25).all() and a[-3:].eq(0.5).all() and a[20:-3].eq(0).all()
