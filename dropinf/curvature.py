"""Curvature (the C in ``score = g_test^T (C + lambda I)^{-1} g_train``), fitted once.

One damping rule for every kind: **relative** damping, ``lambda = damping * trace(C) / dim``,
so ``damping`` is a fraction of the average eigenvalue and means the same thing whatever the
scale of the loss or the compression. ``identity`` is the exception that has no curvature:
``C = 0`` and ``lambda = 1`` (the gradient dot product). For ``exact`` the training objective's
own L2 regulariser ``l2 / 2 * |theta|^2`` is part of C (it is the model's curvature, not a
damping): pass the coefficient the model was trained with.

Sign convention: with a positive definite ``C + lambda I`` a positive score means the training
point is helpful: removing it raises the test loss by about ``score / n``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from torch.func import grad, hessian, jvp, vjp, vmap

from .check import agrees, autograd_grads
from .losses import SplitLoss
from .persample import _losses_of, call_with
from .task import Task, batch_size, to_device

KINDS = ("identity", "fisher", "exact", "ggn")
EXACT_DENSE_MAX = 20_000  # above this many parameters, exact curvature uses conjugate gradient
_COLUMNS = 16_384  # column block of the kernel form's float64 products
_FIT_ROWS = 4096  # row block of the dense Fisher's float64 accumulation
_CG_CHUNK = 64  # right-hand sides per batched curvature product of conjugate gradient


@dataclass(frozen=True)
class Source:
    """Where gradient rows come from: rows of different sources must not be scored together.

    ``compressor``: the compressor's fingerprint; ``model``: the model hash
    (:func:`dropinf.store.model_hash`); ``param_names``: the parameters whose gradients were
    taken, in gradient order. None: unknown, not compared.
    """

    compressor: str | None = None
    model: str | None = None
    param_names: tuple[str, ...] | None = None

    @classmethod
    def of(cls, G: object) -> Source | None:
        """The source of :class:`~dropinf.Gradients`; None for plain tensors and arrays."""
        from .gradients import Gradients  # here: gradients imports this module (through store)

        if not isinstance(G, Gradients):
            return None
        return cls(G.compressor, G.model, tuple(G.param_names))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict | None) -> Source | None:
        if d is None:
            return None
        names = d.get("param_names")
        return cls(d.get("compressor"), d.get("model"), None if names is None else tuple(names))


_SOURCE_FIX = {
    "compressor": (
        "compressors",
        "Use one compressor (same kind, arguments and seed) for test and training rows, and fit "
        "the preconditioner on those training rows",
    ),
    "model": (
        "models (model hashes: sha256 of every parameter and buffer)",
        "Compute test and training rows from the same model (the same weights: a training step "
        "or another checkpoint changes the hash), and fit the preconditioner on those training "
        "rows",
    ),
    "param_names": (
        "parameter selections",
        "Compute test and training rows with the same Task(params=...) selection, and fit the "
        "preconditioner on those training rows",
    ),
}


def check_sources(**sources: Source | None) -> None:
    """Refuse rows (or a preconditioner, ``pre``) of different origins: each field of
    :class:`Source` known on both sides of a pair must agree. Unknown sources pass."""
    known = [(name, s) for name, s in sources.items() if s is not None]
    for (a, sa), (b, sb) in itertools.combinations(known, 2):
        for fld, (what, fix) in _SOURCE_FIX.items():
            va, vb = getattr(sa, fld), getattr(sb, fld)
            if va is None or vb is None or va == vb:
                continue
            if fld == "param_names":
                i = next(
                    (i for i, (x, y) in enumerate(zip(va, vb)) if x != y), min(len(va), len(vb))
                )
                xa, xb = (repr(v[i]) if i < len(v) else "(end)" for v in (va, vb))
                detail = (
                    f"{a}: {len(va)} parameters, {b}: {len(vb)}; they first differ at position "
                    f"{i}: {a} {xa}, {b} {xb}"
                )
            else:
                detail = f"{a}: {va}\n  {b}: {vb}"
            raise ValueError(
                f"{a} and {b} come from different {what}:\n  {detail}\n"
                f"Their scores would be meaningless. {fix}."
            )


def check_finite(rows: Tensor, name: str, offset: int = 0) -> None:
    """Raise a ValueError naming argument ``name`` and the first row (numbered from ``offset``)
    with a NaN or inf entry. Row sums first, cheaply (in the rows' dtype: no copy): a row sum is
    finite whenever every entry is (unless it overflows), so the entries are looked at only
    after a non-finite sum."""
    if torch.isfinite(rows.sum(1)).all():
        return
    bad = ~torch.isfinite(rows).all(1)
    if bad.any():
        i = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"{name} row {offset + i} has a NaN or inf entry ({int(bad.sum())} such rows among "
            f"rows {offset}..{offset + len(rows) - 1}): it would make scores NaN. Drop such rows "
            f"(keep = torch.isfinite({name}).all(1)) or recompute them; dropinf.gradients "
            "refuses non-finite gradients, so look at where these rows came from"
        )


@dataclass
class Preconditioner:
    """A fitted ``(C + lambda I)^{-1}``, applied to the query side only.

    Build with :meth:`fit` (from compressed training gradients) or :meth:`fit_exact` (from the
    task and data, in the full parameter space). ``info`` reports what the fit saw: ``lambda``,
    for ``fisher`` the ``solver`` (dense or kernel form), for ``exact`` the gradient norm at the
    parameters and the smallest eigenvalue of ``C + lambda I`` (dense) or, for the matrix-free
    solver, the last :meth:`apply`'s relative conjugate-gradient residuals and iterations per
    row and ``cg_unconverged``, the rows that stopped at ``cg_maxiter`` (with a warning).

    ``source``: the :class:`Source` of the rows it was fitted on (compressor fingerprint, model
    hash, parameter names), recorded by :meth:`fit` from :class:`~dropinf.Gradients`, None when
    unknown (plain tensors, preconditioners saved before it was recorded). :func:`dropinf.scores`
    refuses rows of another source. A full-parameter-space preconditioner (:meth:`fit_exact`)
    has the source of uncompressed rows: compressor ``Identity().fingerprint``.
    """

    kind: str
    damping: float
    dim: int
    lam: float = 1.0
    eigvals: Tensor | None = None  # (dim,) float64, of C; kernel form: (n,), C's nonzero ones
    eigvecs: Tensor | None = None  # (dim, dim) float64; kernel form: (n, n), those of G G^T
    rows: Tensor | None = None  # kernel form: the (n, dim) training gradients G, not copied
    hvp: object = None  # matrix-free exact curvature: v (d,) -> C v, or V (m, d) -> V C
    cg_tol: float = 1e-8
    cg_maxiter: int = 500
    info: dict = field(default_factory=dict)
    source: Source | None = None  # where the rows it applies to must come from; None: unknown

    @classmethod
    def fit(
        cls,
        G_train: Tensor,
        kind: str = "fisher",
        damping: float = 1e-3,
        solver: str = "auto",
        l2: float | Tensor = 0.0,
    ) -> Preconditioner:
        """``identity`` or ``fisher`` from (n, k) compressed training gradients.

        ``fisher`` is the empirical Fisher ``F = G^T G / n`` of the compressed gradients with
        ``lambda = damping * trace(F) / k``, factorised once in float64. ``solver``: ``"dense"``
        eigendecomposes the k x k matrix F; ``"kernel"`` keeps a reference to G and
        eigendecomposes the n x n ``K = G G^T`` instead, applying the Woodbury identity
        ``(F + lambda I)^{-1} q = (q - G^T (K + n lambda I)^{-1} G q) / lambda``, so no k x k
        matrix is formed (it needs damping > 0, and G left unchanged while in use; its float64
        rounding error grows like 1 / damping, negligible above about 1e-6); ``"auto"`` takes
        the kernel form when k > n. Both give the same scores.

        ``l2``: a regulariser added to the Fisher, ``C = F + diag(l2)``, before the relative
        damping: one number, or a (k,) vector per coordinate of the rows (``solver="dense"``).
        For uncompressed rows (``Identity``) it is the training objective's (see
        :meth:`fit_exact`; ``task.l2_vector({"fc.weight": 1e-3})`` gives the vector of weight
        decay on some parameters only); compressed rows have no per-parameter coordinates in
        general, so there it is a choice of curvature in the rows' space.

        ``G_train`` given as :class:`~dropinf.Gradients` records their :class:`Source` in
        ``source``. ``fisher`` reads every row once and refuses a row with a NaN or inf entry (a
        ValueError naming it); ``identity`` reads none.
        """
        source = Source.of(G_train)
        G = torch.as_tensor(G_train)
        if G.ndim != 2 or G.shape[0] == 0:
            raise ValueError(f"G_train must be (n, k) with n >= 1, got shape {tuple(G.shape)}")
        if kind == "identity":
            return cls("identity", 0.0, G.shape[1], source=source)
        if kind != "fisher":
            hint = " (use Preconditioner.fit_exact)" if kind in ("exact", "ggn") else ""
            raise ValueError(f"kind={kind!r}; fit takes 'identity' or 'fisher'{hint}")
        _check_damping(damping)
        if solver not in ("auto", "dense", "kernel"):
            raise ValueError(f"solver={solver!r}; choose 'auto', 'dense' or 'kernel'")
        n, k = G.shape
        l2 = _l2_of_rows(l2, k)
        if solver == "kernel" or (solver == "auto" and k > n):
            if l2.ndim:
                raise ValueError(
                    f"l2 per coordinate (a vector of {k}) needs solver='dense'; the kernel form "
                    f"(taken when k={k} > n={n} with solver='auto') adds one number to F's diagonal"
                )
            return cls._fit_kernel(G, damping, source, float(l2))
        F = torch.zeros(k, k, dtype=torch.float64)
        for i in range(0, n, _FIT_ROWS):  # accumulate in float64 without a float64 copy of G
            g = G[i : i + _FIT_ROWS].double()
            check_finite(g, "G_train", i)
            F += g.T @ g
        F /= n
        F.diagonal().add_(l2)
        info = {"n": n, "solver": "dense", "l2": float(l2) if l2.ndim == 0 else "per coordinate"}
        pre = cls._from_matrix("fisher", F, damping, info)
        pre.source = source
        return pre

    @classmethod
    def _fit_kernel(
        cls,
        G: Tensor,
        damping: float,
        source: Source | None,
        l2: float = 0.0,
        K: Tensor | None = None,
    ) -> Preconditioner:
        """The Fisher through ``K = G G^T = U diag(sigma) U^T``: F's nonzero eigenvalues are
        ``sigma / n``, kept in ``eigvals`` (with U in ``eigvecs``), the rest are 0; ``l2 I`` and
        the damping join ``lam``, the isotropic part that Woodbury inverts. A NaN or inf
        entry of row i makes ``K[i, i]`` non-finite: K's diagonal detects it at no extra cost,
        and only then are the rows scanned to name it. ``K``: ``G G^T`` in float64 when already
        summed (by :func:`dropinf.distributed.fit`, over processes)."""
        n, k = G.shape
        if not damping > 0:
            raise ValueError(
                f"damping={damping!r} with k={k} > n={n}: the Fisher of fewer gradients than "
                "dimensions is singular; give damping > 0 (or solver='dense' to see it fail)"
            )
        if K is None:
            K = torch.zeros(n, n, dtype=torch.float64)
            for j in range(0, k, _COLUMNS):  # float64 products without a float64 copy of G
                g = G[:, j : j + _COLUMNS].double()
                K += g @ g.T
        if not torch.isfinite(torch.diagonal(K)).all():
            for i in range(0, n, _FIT_ROWS):  # name the first bad row
                check_finite(G[i : i + _FIT_ROWS], "G_train", i)
            raise ValueError("G_train has rows whose squared norm overflows float64; rescale it")
        lam = damping * (float(torch.trace(K)) / n / k + l2)  # damping * trace(F + l2 I) / k
        sigma, U = torch.linalg.eigh(K)
        # F has rank <= n < k: the smallest eigenvalue of F + (l2 + lam) I is l2 + lam
        info = {"n": n, "solver": "kernel", "l2": l2, "lambda": lam, "min_eig": lam + l2}
        lam += l2
        return cls(
            "fisher",
            damping,
            k,
            lam=lam,
            eigvals=sigma.clamp_min(0.0) / n,
            eigvecs=U,
            rows=G,
            info=info,
            source=source,
        )

    @classmethod
    def fit_exact(
        cls,
        task: Task,
        loader: Iterable,
        damping: float = 0.0,
        l2: float | Mapping[str, float] = 0.0,
        solver: str = "auto",
        cg_tol: float = 1e-8,
        cg_maxiter: int = 500,
        kind: str = "exact",
        check: bool = True,
    ) -> Preconditioner:
        """Curvature of the mean training loss plus the training regulariser ``diag(l2)``, in the
        full parameter space.

        ``l2``: the coefficient c of the training objective's ``c / 2 * |theta|^2``, one number
        for every selected parameter or a mapping from parameter name (``task.param_names``)
        to its coefficient, 0 for those not named (weight decay on weights only, say); see
        :meth:`~dropinf.Task.l2_vector`. Keep it out of the loss: at a regularised stationary
        point the mean loss gradient is ``-l2 * theta``, not 0, and ``info["grad_norm"]`` is
        that of the whole objective, ``|mean loss gradient + l2 * theta|``.

        ``kind``: ``"exact"``, the Hessian; ``"ggn"``, the Gauss-Newton matrix ``J^T H_out J``
        (J the Jacobian of the model output, H_out the Hessian of the loss in the output),
        positive semi-definite; it needs a :class:`~dropinf.losses.SplitLoss` such as
        ``losses.cross_entropy``. ``solver``: ``"dense"`` (float64 matrix, eigendecomposed),
        ``"cg"`` (conjugate gradient on curvature-vector products, each a pass over
        ``loader``; :meth:`apply` solves all its rows as one block, one batched product per
        iteration, and warns when rows stop at ``cg_maxiter`` above ``cg_tol``) or ``"auto"``
        (dense up to :data:`EXACT_DENSE_MAX` parameters). Scores
        then need the uncompressed gradients (``Identity``). Refuses an indefinite
        ``C + lambda I``. ``check``: compare the gradient of the first batch, as the functional
        form used here computes it, with autograd's on the model, parameter by parameter
        (tolerance ``sqrt(eps)`` of the parameter dtype), and refuse a mismatch naming the
        parameter: it means the loss does something the functional form does not see.
        """
        _check_damping(damping)
        if solver not in ("auto", "dense", "cg"):
            raise ValueError(f"solver={solver!r}; choose 'auto', 'dense' or 'cg'")
        if kind not in ("exact", "ggn"):
            raise ValueError(f"kind={kind!r}; fit_exact takes 'exact' or 'ggn'")
        if kind == "ggn" and not isinstance(task.loss, SplitLoss):
            raise TypeError(
                f"kind='ggn' needs the model output separated from the loss; task.loss is "
                f"{task.loss!r}. Use a dropinf.losses.SplitLoss (losses.cross_entropy, "
                "losses.causal_lm, ...) or wrap yours: SplitLoss(output=..., from_output=...)"
            )
        dev = task.device
        batches = [to_device(b, dev) for b in loader]
        if not batches:
            raise ValueError("loader yielded no batch; the exact Hessian needs training data")
        theta = torch.cat([p.detach().reshape(-1) for p in _selected(task)]).double()
        d = theta.numel()
        solver = ("dense" if d <= EXACT_DENSE_MAX else "cg") if solver == "auto" else solver
        n = sum(batch_size(b) for b in batches)
        l2_vec = task.l2_vector(l2, dev)
        with task.evaluating():
            fs = [_flat_loss(task, b) for b in batches]
            with torch.enable_grad():
                g = torch.zeros(d, dtype=torch.float64, device=dev)
                for i, f in enumerate(fs):
                    g_i = grad(f)(theta)
                    if check and i == 0:
                        _check_functional(task, batches[0], g_i)
                    g += g_i
            grad_norm = float((g / n + l2_vec * theta).norm())
            l2_info = dict(l2) if isinstance(l2, Mapping) else l2
            info = {"n": n, "grad_norm": grad_norm, "l2": l2_info, "solver": solver}
            if kind == "ggn":
                products = [_ggn_product(task, b, theta) for b in batches]
            else:
                products = [lambda v, f=f: jvp(grad(f), (theta,), (v,))[1] for f in fs]
            if solver == "dense":
                H = torch.zeros(d, d, dtype=torch.float64, device=dev)
                if kind == "exact":
                    for f in fs:
                        H += hessian(f)(theta)
                else:  # columns of G, a chunk of unit vectors at a time
                    eye = torch.eye(d, dtype=torch.float64, device=dev)
                    for i in range(0, d, 256):
                        for prod in products:
                            H[:, i : i + 256] += vmap(prod)(eye[i : i + 256]).T
                H = (H + H.T).cpu() / 2 / n + torch.diag(l2_vec.cpu())
                pre = cls._from_matrix(kind, H, damping, info)
                pre.source = _full_space(task)
                return pre

        def hvp(V: Tensor) -> Tensor:  # (d,) or (m, d) on the CPU, computed on the device
            V_dev = V.to(dev)
            out = l2_vec * V_dev
            with task.evaluating(), torch.enable_grad():
                for prod in products:
                    if V.ndim == 1:
                        out = out + prod(V_dev) / n
                    else:  # one batched product per batch of data, _CG_CHUNK rows at a time
                        out = out + vmap(prod, chunk_size=_CG_CHUNK)(V_dev) / n
            return out.cpu()

        # trace(H) by Hutchinson with a fixed seed: only the damping's scale depends on it
        gen = torch.Generator().manual_seed(0)
        probes = torch.randint(2, (8, d), generator=gen).double() * 2 - 1
        trace = float((probes * hvp(probes)).sum()) / len(probes)
        lam = damping * trace / d
        return cls(
            kind,
            damping,
            d,
            lam=lam,
            hvp=hvp,
            cg_tol=cg_tol,
            cg_maxiter=cg_maxiter,
            info={**info, "trace_estimate": trace},
            source=_full_space(task),
        )

    @classmethod
    def _from_matrix(cls, kind: str, C: Tensor, damping: float, info: dict) -> Preconditioner:
        k = C.shape[0]
        lam = damping * float(torch.trace(C)) / k
        eigvals, eigvecs = torch.linalg.eigh(C)
        min_eig = float(eigvals.min()) + lam
        info = {**info, "lambda": lam, "min_eig": min_eig}
        if min_eig <= 0:
            raise ValueError(
                f"{kind} curvature plus damping is not positive definite (smallest eigenvalue "
                f"{min_eig:.3g}); train to a minimum with weight decay (l2=...) or raise damping"
            )
        return cls(kind, damping, k, lam=lam, eigvals=eigvals, eigvecs=eigvecs, info=info)

    def with_damping(self, damping: float) -> Preconditioner:
        """This preconditioner at another relative damping, without a new factorisation.

        ``lambda = damping * trace(C) / dim`` is proportional to the damping, so only ``lam``
        changes (a kernel-form Fisher's ``l2``, also held in ``lam``, stays); the result equals
        a refit at ``damping`` to rounding. Needs a fit with damping > 0.
        """
        _check_damping(damping)
        if self.kind == "identity":
            return self
        if not self.damping > 0:
            raise ValueError(
                f"this preconditioner was fitted with damping={self.damping!r}; rescaling needs "
                "a fit with damping > 0 (refit at the damping you want)"
            )
        l2 = float(self.info.get("l2", 0.0)) if self.rows is not None else 0.0
        lam_damping = (self.lam - l2) * damping / self.damping
        lam = lam_damping + l2
        info = {**self.info, "lambda": lam_damping}
        if "min_eig" in info:
            info["min_eig"] = self.info["min_eig"] - self.lam + lam
        return dataclasses.replace(self, damping=damping, lam=lam, info=info)

    def apply(self, Q: Tensor, dtype: torch.dtype | None = None) -> Tensor:
        """``(C + lambda I)^{-1} q`` for each row of Q: (m, dim) -> (m, dim).

        The solve runs in float64 (except ``identity``, a cast); the result is rounded to
        ``dtype``: by default float32, float64 for float64 input. Its entries are amplified by
        up to ``1 / lambda`` and cancel in a product with gradients, so rounding them to float32
        costs about ``u32 * sum_i |q_i g_i|`` per score: :func:`dropinf.scores` asks for float64.
        """
        Q = torch.as_tensor(Q)
        if Q.ndim != 2 or Q.shape[1] != self.dim:
            raise ValueError(
                f"gradients of shape {tuple(Q.shape)} do not match this {self.kind} "
                f"preconditioner of dimension {self.dim}; use gradients from the same compressor"
            )
        if dtype is None:
            dtype = torch.float64 if Q.dtype == torch.float64 else torch.float32
        elif dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype={dtype!r}; apply returns torch.float32 or torch.float64")
        if self.kind == "identity":
            return Q.to(dtype)
        if self.hvp is not None:
            return self._cg(Q.double()).to(dtype)
        if self.rows is not None:
            return self._apply_kernel(Q, dtype)
        if self.eigvecs.shape[0] != self.dim:
            raise ValueError(
                f"this fisher preconditioner of dimension {self.dim} is in kernel form "
                f"(eigenvectors of shape {tuple(self.eigvecs.shape)}) but has lost its training "
                "rows; refit it with Preconditioner.fit(G_train)"
            )
        V, w = self.eigvecs, self.eigvals + self.lam
        return (((Q.double() @ V) / w) @ V.T).to(dtype)

    def _apply_kernel(self, Q: Tensor, dtype: torch.dtype) -> Tensor:
        """Woodbury: ``(q - G^T (K + n lambda I)^{-1} G q) / lambda``, float64 over column
        blocks, written into the (m, dim) output block by block."""
        G, U = self.rows, self.eigvecs
        n = G.shape[0]
        A = torch.zeros(Q.shape[0], n, dtype=torch.float64)  # Q G^T
        for j in range(0, self.dim, _COLUMNS):
            A += Q[:, j : j + _COLUMNS].double() @ G[:, j : j + _COLUMNS].double().T
        W = ((A @ U) / (n * (self.eigvals + self.lam))) @ U.T  # A (K + n lambda I)^{-1}
        out = torch.empty(Q.shape[0], self.dim, dtype=dtype)
        for j in range(0, self.dim, _COLUMNS):
            q = Q[:, j : j + _COLUMNS].double()
            out[:, j : j + _COLUMNS] = (q - W @ G[:, j : j + _COLUMNS].double()) / self.lam
        return out

    def _cg(self, B: Tensor) -> Tensor:
        """Solve ``(C + lambda I) X^T = B^T`` for the (m, dim) rows B by conjugate gradient, all
        rows as one block: each iteration takes one batched curvature product over the rows not
        yet converged (a row stops once its residual is below ``cg_tol`` times its norm).
        ``info`` gets this call's per-row ``cg_residuals`` (relative) and ``cg_iterations``, and
        ``cg_unconverged``, the rows that stopped at ``cg_maxiter`` above the tolerance (a
        RuntimeWarning says so)."""
        X, R = torch.zeros_like(B), B.clone()
        P = R.clone()
        rr = (R * R).sum(1)
        bnorm = B.norm(dim=1)
        bnorm = torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm))
        iters = torch.zeros(len(B), dtype=torch.long)
        active = rr.sqrt() > self.cg_tol * bnorm
        for _ in range(self.cg_maxiter):
            if not active.any():
                break
            a = active.nonzero().squeeze(1)
            Pa = P[a]
            AP = self.hvp(Pa) + self.lam * Pa
            pAp = (Pa * AP).sum(1)
            if not (pAp > 0).all():
                raise ValueError(
                    "exact curvature is not positive definite along a CG direction; train with "
                    "weight decay (l2=...) or raise damping"
                )
            alpha = rr[a] / pAp
            X[a] += alpha[:, None] * Pa
            R[a] -= alpha[:, None] * AP
            rr_new = (R[a] * R[a]).sum(1)
            P[a] = R[a] + (rr_new / rr[a])[:, None] * Pa
            rr[a] = rr_new
            iters[a] += 1
            active[a] = rr_new.sqrt() > self.cg_tol * bnorm[a]
        residuals = (rr.sqrt() / bnorm).tolist()
        stuck = int(active.sum())
        self.info.update(cg_residuals=residuals, cg_iterations=iters.tolist(),
                         cg_unconverged=stuck)
        if stuck:
            warnings.warn(
                f"conjugate gradient stopped at cg_maxiter={self.cg_maxiter} for {stuck} of "
                f"{len(B)} rows without reaching cg_tol={self.cg_tol:g} (largest relative "
                f"residual {max(residuals):.3g}); raise cg_maxiter or damping, or use "
                "solver='dense'",
                RuntimeWarning,
                stacklevel=3,
            )
        return X


def _l2_of_rows(l2: object, k: int) -> Tensor:
    """``l2`` of :meth:`Preconditioner.fit` as a float64 scalar or (k,) tensor, checked."""
    if isinstance(l2, Mapping):
        raise TypeError(
            "Preconditioner.fit(l2=...) takes a number or a (k,) vector: the rows' coordinates "
            "are not parameters in general. For uncompressed rows pass task.l2_vector(mapping)"
        )
    t = torch.as_tensor(l2, dtype=torch.float64)
    if t.ndim > 1 or (t.ndim == 1 and t.shape[0] != k):
        raise ValueError(f"l2 of shape {tuple(t.shape)}: give a number or a vector of k={k}")
    if not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError("l2 must be finite and >= 0 (coefficients of c/2 * theta^2)")
    return t


def _check_damping(damping: float) -> None:
    ok = isinstance(damping, int | float) and not isinstance(damping, bool)
    if not ok or not math.isfinite(damping) or damping < 0:
        raise ValueError(
            f"damping={damping!r} must be a finite number >= 0 (a fraction of trace/dim)"
        )


def _full_space(task: Task) -> Source:
    """The source of the rows a full-parameter-space preconditioner applies to: the task's
    uncompressed gradients (``Identity``)."""
    from .compressors import Identity
    from .store import model_hash  # here: store imports this module

    return Source(Identity().fingerprint, model_hash(task.model), tuple(task.param_names))


def _selected(task: Task) -> list[Tensor]:
    named = dict(task.model.named_parameters())
    return [named[q.name] for q in task.params]


def _params_at(task: Task, theta: Tensor) -> dict[str, Tensor]:
    """Every parameter of the model for :func:`~dropinf.persample.call_with`: the selected ones
    from ``theta`` (d,), in their own dtype; the others as constants (detached), so nothing
    fitted here keeps autograd history of parameters left out of ``Task(params=...)``."""
    named = dict(task.model.named_parameters())
    out = {n: p.detach() for n, p in named.items()}
    for q in task.params:
        out[q.name] = theta[q.offset : q.stop].view(q.shape).to(named[q.name].dtype)
    return out


def _flat_loss(task: Task, batch: object):
    """theta (d,) float64 -> summed per-sample loss of ``batch`` at those parameters."""

    def f(theta: Tensor) -> Tensor:
        losses = call_with(task.model, _params_at(task, theta), _losses_of(task), batch)
        return losses.sum().double()

    return f


def _check_functional(task: Task, batch: object, g_func: Tensor) -> None:
    """Refuse when the functional gradient of ``batch``'s summed loss (``g_func``, (d,)) differs
    from autograd's on the model itself, naming the parameter."""
    named = dict(task.model.named_parameters())
    ref = autograd_grads(task, task.per_sample_losses(batch))
    for q in task.params:
        want, got = ref[q.name], g_func[q.offset : q.stop]
        ok, rel = agrees(got, want, float(got.norm() + want.double().norm()), named[q.name].dtype)
        if not ok:
            raise ValueError(
                f"fit_exact: the gradient of {q.name!r} on the first batch differs between the "
                f"functional form (parameters substituted for the whole loss call) and autograd "
                f"on the model (relative error {rel:.2g}). The loss reads the parameter in a way "
                "torch.func does not see (e.g. through .data, a copy made before the call, or "
                "state cached across calls); compute it from model(...) or model's attributes "
                "inside the loss, and give a weight penalty as fit_exact(l2=...) rather than in "
                "the loss"
            )


def _ggn_product(task: Task, batch: object, theta: Tensor):
    """v (d,) -> ``J^T H_out J v`` summed over the batch (float64), for a :class:`SplitLoss`."""
    loss: SplitLoss = task.loss  # checked by the caller

    def out(t: Tensor) -> Tensor:
        return call_with(task.model, _params_at(task, t), loss.output, batch).double()

    def total(o: Tensor) -> Tensor:
        return loss.from_output(o, batch).sum()

    def prod(v: Tensor) -> Tensor:
        o, jv = jvp(out, (theta,), (v,))
        hjv = jvp(grad(total), (o,), (jv,))[1]
        return vjp(out, theta)[1](hjv)[0]

    return prod
