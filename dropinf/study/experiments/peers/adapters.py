"""One small adapter per peer library: the same model, data and curvature choice in, an
(n_test, n_train) float64 score matrix in dropinf's sign convention out (positive = helpful:
removing the training point raises the test loss).

Every adapter takes a :class:`Problem` and one setting of its library, builds what the library
needs (its task object, data loaders, a temporary output directory), runs it and returns the
scores. The libraries are imported inside the adapters, so that this module imports without
them; :func:`available` says which import and why the others do not. Nothing here copies peer
code: each adapter calls the library's public API as its documentation describes.

Curvature and damping, per library (``problem.l2``: the training objective's L2 coefficient;
``problem.lam``: the absolute damping that dropinf's relative rule gives, ``damping *
trace(F) / d`` of the uncompressed empirical Fisher):

- dattri's Hessian-based attributors (explicit, CG, LiSSA, Arnoldi) invert the Hessian of the
  mean training loss plus ``regularization * I``: we pass ``l2 + lam``, so with ``lam = 0`` they
  compute the same exact influence as ``Preconditioner.fit_exact(l2=...)``;
- TRAK (dattri's and ``traker``) inverts ``Phi^T Phi`` of projected output gradients (dattri:
  plus ``regularization * I``, left at 0 as TRAK prescribes);
- kronfluence and LogIX add their own heuristic damping, ``0.1 x`` the mean eigenvalue, which is
  dropinf's relative rule at ``damping = 0.1`` (kronfluence per module, LogIX per module).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ....persample import call_with

PEERS = ("dattri", "trak", "kronfluence", "logix")
MODULES = {"dattri": "dattri", "trak": "trak", "kronfluence": "kronfluence", "logix": "logix"}
DISTRIBUTIONS = {"dattri": "dattri", "trak": "traker", "kronfluence": "kronfluence",
                 "logix": "logix-ai"}

Batch = tuple | dict


@dataclass
class Problem:
    """What every library is given.

    ``model``: float32, eval mode, the attributed layers ``modules`` all ``nn.Linear`` (their
    weight and bias are the parameters of influence). ``loss(model, batch) -> (B,)`` per-sample
    losses. ``train``/``test``: one batch each, a tuple ``(x, y)`` or a dict of (n, ...) tensors
    (``keys`` fixes the dict's order when a library wants a tuple). ``l2``: the training
    objective's L2 coefficient; ``lam``: the absolute damping of dropinf's relative rule;
    ``batch_size``: the batch of every pass over the data. ``kind``: ``"classification"``
    (``(x, y)``, logits out) or ``"lm"`` (GPT-2, ``input_ids``/``attention_mask``).
    """

    model: nn.Module
    loss: Callable[[nn.Module, Batch], Tensor]
    train: Batch
    test: Batch
    modules: list[str]
    l2: float = 0.0
    lam: float = 0.0
    batch_size: int = 256
    kind: str = "classification"
    seed: int = 0

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.train) if isinstance(self.train, dict) else ()

    @property
    def n_train(self) -> int:
        return n_rows(self.train)

    @property
    def n_test(self) -> int:
        return n_rows(self.test)

    def param_names(self) -> list[str]:
        """The attributed parameters, in model order (weight then bias of each module)."""
        wanted = set(self.modules)
        return [n for n, _ in self.model.named_parameters() if n.rsplit(".", 1)[0] in wanted]

    def as_tuple(self, batch: Batch) -> tuple[Tensor, ...]:
        return tuple(batch[k] for k in self.keys) if isinstance(batch, dict) else tuple(batch)

    def from_tuple(self, parts: tuple[Tensor, ...]) -> Batch:
        return dict(zip(self.keys, parts)) if self.keys else tuple(parts)


def n_rows(batch: Batch) -> int:
    return len(next(iter(batch.values())) if isinstance(batch, dict) else batch[0])


def available() -> dict[str, str | None]:
    """``{peer: None if it imports, else the reason}``, with the version that imports."""
    out: dict[str, str | None] = {}
    for peer in PEERS:
        try:
            importlib.import_module(MODULES[peer])
            out[peer] = None
        except Exception as e:  # noqa: BLE001 - any import failure is a reason to record
            out[peer] = f"{type(e).__name__}: {e}"
    return out


def version(peer: str) -> str | None:
    try:
        return importlib.metadata.version(DISTRIBUTIONS[peer])
    except importlib.metadata.PackageNotFoundError:
        return None


class _Rows(torch.utils.data.Dataset):
    """The samples of a batch as a map-style dataset of tuples (what the libraries iterate)."""

    def __init__(self, parts: tuple[Tensor, ...]):
        self.parts = parts

    def __len__(self) -> int:
        return len(self.parts[0])

    def __getitem__(self, i: int) -> tuple[Tensor, ...]:
        return tuple(p[i] for p in self.parts)


def _loader(parts: tuple[Tensor, ...], batch_size: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(_Rows(parts), batch_size=batch_size, shuffle=False)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The libraries' progress bars, log lines and warnings kept out of the notebook."""
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logging.disable(level)


def _mean_loss(problem: Problem) -> Callable:
    """dattri's ``loss_func(params, data)``: the mean loss of ``data`` (a tuple) with the
    attributed parameters replaced by ``params`` (a name -> tensor dict)."""

    def f(params: dict[str, Tensor], data: tuple[Tensor, ...]) -> Tensor:
        if problem.kind == "classification":  # dattri's LiSSA sampler casts labels to float
            data = (data[0], data[1].long())
        return call_with(problem.model, params, lambda m, b: problem.loss(m, b).mean(),
                         problem.from_tuple(data))

    return f


# --------------------------------------------------------------------------- dattri


def dattri_influence(problem: Problem, method: str, **setting) -> np.ndarray:
    """dattri's influence function: ``method`` ``"explicit"``, ``"cg"`` (``max_iter``),
    ``"lissa"`` (``recursion_depth``, ``batch_size``, ``scaling``) or ``"arnoldi"``
    (``proj_dim``, ``max_iter``), on the Hessian of the mean training loss plus
    ``(l2 + lam) I``. dattri returns (n_train, n_test) ``g_train^T H^-1 g_test``: positive =
    helpful already; we transpose it."""
    from dattri.algorithm import influence_function as dif
    from dattri.task import AttributionTask

    reg = problem.l2 + problem.lam
    names = problem.param_names()
    task = AttributionTask(loss_func=_mean_loss(problem), model=problem.model,
                           checkpoints=problem.model.state_dict())
    if method == "explicit":
        att = dif.IFAttributorExplicit(task, layer_name=names, regularization=reg)
    elif method == "cg":
        att = dif.IFAttributorCG(task, layer_name=names, regularization=reg, **setting)
    elif method == "lissa":
        att = dif.IFAttributorLiSSA(task, layer_name=names, damping=reg, **setting)
    elif method == "arnoldi":
        att = dif.IFAttributorArnoldi(task, layer_name=names, regularization=reg,
                                      seed=problem.seed, **setting)
    else:
        raise ValueError(f"method={method!r}: 'explicit', 'cg', 'lissa' or 'arnoldi'")
    # the whole training set in one batch: dattri's Hessian is that of the batch it is given,
    # and attribute() transforms the test rows once per training batch
    train = _loader(problem.as_tuple(problem.train), problem.n_train)
    test = _loader(problem.as_tuple(problem.test), problem.n_test)
    with _quiet():
        att.cache(train)
        S = att.attribute(train, test)
    return S.detach().double().numpy().T


def dattri_trak(problem: Problem, proj_dim: int) -> np.ndarray:
    """dattri's TRAK on one checkpoint: gradients of the margin ``log p / (1 - p)`` projected to
    ``proj_dim``, ``x^T (Phi^T Phi)^-1 phi_j`` times ``1 - p_j``. Positive = helpful (the
    margin rises with the point); transposed to (n_test, n_train)."""
    from dattri.algorithm.trak import TRAKAttributor
    from dattri.task import AttributionTask

    if problem.kind != "classification":
        raise ValueError("this adapter's TRAK output function is for classification")
    model = problem.model

    def logp(params, data):  # per sample: data of unbatched tensors
        x, y = data
        logits = call_with(model, params, lambda m, b: m(b), x.unsqueeze(0))
        return -nn.functional.cross_entropy(logits, y.long().view(1))

    def margin(params, data):
        lp = logp(params, data)
        return lp - torch.log1p(-torch.exp(lp).clamp_max(1 - 1e-7))

    def prob(params, data):
        return torch.exp(logp(params, data))

    task = AttributionTask(loss_func=margin, model=model, checkpoints=model.state_dict())
    att = TRAKAttributor(task, correct_probability_func=prob, layer_name=problem.param_names(),
                         projector_kwargs={"proj_dim": proj_dim, "proj_max_batch_size": 32,
                                           "proj_seed": problem.seed, "device": "cpu"})
    train = _loader(problem.as_tuple(problem.train), problem.batch_size)
    test = _loader(problem.as_tuple(problem.test), problem.batch_size)
    with _quiet():
        att.cache(train)
        S = att.attribute(test)
    return S.detach().double().numpy().T


# --------------------------------------------------------------------------- traker


def traker_trak(problem: Problem, proj_dim: int, tmp: str) -> np.ndarray:
    """``traker``'s TRAKer (image-classification output: the margin), one checkpoint, the CPU
    projector. Its scores are (n_train, n_test), positive = helpful; transposed."""
    from trak import TRAKer
    from trak.projectors import BasicProjector, ProjectionType

    if problem.kind != "classification":
        raise ValueError("traker has no causal-LM output function; not run on this task")
    model = problem.model
    d = sum(p.numel() for p in model.parameters())
    # two blocks or more: with one, traker 0.3.2's CPU projector frees its matrix after
    # featurising and then scores with the freed one; with several it regenerates each block
    proj = BasicProjector(grad_dim=d, proj_dim=proj_dim, seed=problem.seed,
                          proj_type=ProjectionType.rademacher, device="cpu",
                          dtype=torch.float32, block_size=max(1, (proj_dim + 1) // 2))
    with _quiet():
        tr = TRAKer(model=model, task="image_classification", train_set_size=problem.n_train,
                    save_dir=tmp, device="cpu", projector=proj, proj_dim=proj_dim,
                    use_half_precision=False)
        tr.load_checkpoint(model.state_dict(), model_id=0)
        x, y = problem.train
        for i in range(0, len(y), problem.batch_size):
            tr.featurize(batch=(x[i : i + problem.batch_size], y[i : i + problem.batch_size]),
                         num_samples=len(y[i : i + problem.batch_size]))
        tr.finalize_features()
        xt, yt = problem.test
        tr.start_scoring_checkpoint(exp_name="peers", checkpoint=model.state_dict(),
                                    model_id=0, num_targets=len(yt))
        for i in range(0, len(yt), problem.batch_size):
            tr.score(batch=(xt[i : i + problem.batch_size], yt[i : i + problem.batch_size]),
                     num_samples=len(yt[i : i + problem.batch_size]))
        S = tr.finalize_scores(exp_name="peers")
    return np.asarray(S, dtype=np.float64).T


# --------------------------------------------------------------------------- kronfluence


def kronfluence_scores(problem: Problem, strategy: str, tmp: str) -> np.ndarray:
    """kronfluence's pairwise scores with ``strategy`` ``"identity"``, ``"diagonal"``,
    ``"kfac"`` or ``"ekfac"`` over ``problem.modules``, the true Fisher (labels sampled from the
    model, seeded) and kronfluence's heuristic damping (``0.1 x`` the mean eigenvalue). Its
    measurement is the test loss and its score ``g_test^T H^-1 g_train``: positive = helpful,
    as here."""
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task as KTask

    loss, modules, p = problem.loss, list(problem.modules), problem
    gen = torch.Generator().manual_seed(problem.seed)

    class _Task(KTask):
        def compute_train_loss(self, batch, model, sample=False):
            b = p.from_tuple(batch)
            if not sample:
                return loss(model, b).sum()
            if p.kind != "classification":
                return _sampled_lm_loss(model, b, gen)
            x, _ = b
            logits = model(x)
            with torch.no_grad():
                y = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=gen)
            return nn.functional.cross_entropy(logits, y[:, 0], reduction="sum")

        def compute_measurement(self, batch, model):
            return loss(model, p.from_tuple(batch)).sum()

        def get_influence_tracked_modules(self):
            return modules

    task = _Task()
    model = prepare_model(_copy(problem.model), task)
    train = _Rows(problem.as_tuple(problem.train))
    test = _Rows(problem.as_tuple(problem.test))
    with _quiet():
        an = Analyzer("peers", model=model, task=task, cpu=True, disable_tqdm=True,
                      output_dir=tmp)
        an.fit_all_factors("f", dataset=train, per_device_batch_size=problem.batch_size,
                           factor_args=FactorArguments(strategy=strategy),
                           overwrite_output_dir=True)
        an.compute_pairwise_scores("s", factors_name="f", query_dataset=test,
                                   train_dataset=train,
                                   per_device_query_batch_size=problem.batch_size,
                                   per_device_train_batch_size=problem.batch_size,
                                   score_args=ScoreArguments(damping_factor=None),
                                   overwrite_output_dir=True)
        S = an.load_pairwise_scores("s")["all_modules"]
    return S.double().numpy()


def _sampled_lm_loss(model: nn.Module, batch: dict, gen: torch.Generator) -> Tensor:
    """Summed next-token loss with targets drawn from the model's own predictions (the true
    Fisher of a causal LM), over the tokens that the attention mask keeps."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1]
    with torch.no_grad():
        probs = torch.softmax(logits.detach().reshape(-1, logits.shape[-1]), -1)
        y = torch.multinomial(probs, 1, generator=gen).view(logits.shape[:2])
    keep = batch["attention_mask"][:, 1:].to(logits.dtype)
    ce = nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none")
    return (ce * keep).sum()


def _copy(model: nn.Module) -> nn.Module:
    """A deep copy: kronfluence and LogIX wrap or hook the modules they track."""
    import copy

    return copy.deepcopy(model).eval()


# --------------------------------------------------------------------------- LogIX


def logix_scores(problem: Problem, rank: int, hessian: str, tmp: str) -> np.ndarray:
    """LogIX's LoGra: each tracked Linear layer's gradient compressed by a random rank-``rank``
    projection of its input and of its output gradient (LogIX's LoRA with random init), the
    curvature ``hessian`` ``"raw"`` (the compressed gradients' covariance) or ``"kfac"``, with
    LogIX's heuristic damping (``0.1 x`` the mean eigenvalue). The logged loss is the summed
    training loss; LogIX's ``dot`` mode gives ``g_test^T H^-1 g_train``, positive = helpful.
    Returns (n_test, n_train)."""
    import logix

    model = _copy(problem.model)
    p = problem
    with _quiet(), torch.random.fork_rng():
        torch.manual_seed(problem.seed)  # LogIX draws its projections from torch's global RNG
        cfg_path = f"{tmp}/logix.yaml"  # its logs go under tmp, not ./logix
        with open(cfg_path, "w") as f:
            f.write(f"root_dir: {tmp}\nlora:\n  init: random\n  rank: {rank}\n")
        run = logix.LogIX(project="peers", config=cfg_path)
        run.watch(model, name_filter=list(problem.modules))
        sched = logix.LogIXScheduler(run, lora="random", hessian=hessian, save="grad")
        train = problem.as_tuple(problem.train)
        for _ in sched:
            for i in range(0, problem.n_train, problem.batch_size):
                part = tuple(t[i : i + problem.batch_size] for t in train)
                ids = [str(j) for j in range(i, i + len(part[0]))]
                with run(data_id=ids):
                    model.zero_grad()
                    p.loss(model, p.from_tuple(part)).sum().backward()
            run.finalize()
        run.setup({"grad": ["log"]})
        run.eval()
        log_loader = run.build_log_dataloader(batch_size=problem.n_train)
        test = problem.as_tuple(problem.test)
        rows = []
        for i in range(0, problem.n_test, problem.batch_size):
            part = tuple(t[i : i + problem.batch_size] for t in test)
            with run(data_id=[f"t{j}" for j in range(i, i + len(part[0]))]):
                model.zero_grad()
                p.loss(model, p.from_tuple(part)).sum().backward()
            log = run.get_log()
            res = run.influence.compute_influence_all(log, log_loader, mode="dot")
            rows.append(_ordered(res, problem.n_train))
    return np.concatenate(rows)


def _ordered(res: dict, n_train: int) -> np.ndarray:
    """LogIX's result ``{"src_ids", "tgt_ids", "influence"}`` as (n_src, n_train) float64 in
    training order (its log loader may reorder the training points)."""
    S = res["influence"].detach().double().cpu().numpy()
    tgt = [int(t) for t in res["tgt_ids"]]
    if sorted(tgt) != list(range(n_train)):
        raise RuntimeError(f"LogIX returned {len(tgt)} training ids, not the {n_train} logged")
    out = np.empty_like(S)
    out[:, tgt] = S
    return out


def run_peer(peer: str, method: str, problem: Problem, setting: dict) -> np.ndarray:
    """One peer point: ``(peer, method)`` at ``setting`` on ``problem``, in a fresh temporary
    directory (kronfluence, traker and LogIX write their factors and logs there)."""
    with tempfile.TemporaryDirectory(prefix=f"dropinf-{peer}-") as tmp:
        if peer == "dattri" and method == "trak":
            return dattri_trak(problem, **setting)
        if peer == "dattri":
            return dattri_influence(problem, method, **setting)
        if peer == "trak":
            return traker_trak(problem, tmp=tmp, **setting)
        if peer == "kronfluence":
            return kronfluence_scores(problem, method, tmp=tmp)
        if peer == "logix":
            return logix_scores(problem, hessian=method, tmp=tmp, **setting)
    raise ValueError(f"peer={peer!r} is not one of {PEERS}")
