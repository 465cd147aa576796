"""Routing: which selected parameters the hooks handle (by module) and which go through
``torch.func``, and which layers compressors may form from their factors."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from torch import nn

from .task import Task


def _is_hf_conv1d(m: nn.Module) -> bool:
    return (
        type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None
    )


def _hookable(m: nn.Module) -> str | None:
    """Kind of factored path a module supports, or None."""
    if type(m) is nn.Linear:
        return "linear"
    if _is_hf_conv1d(m):
        return "conv1d"
    if type(m) is nn.Conv2d and m.padding_mode == "zeros":
        return "conv2d"
    if type(m) is nn.LayerNorm and m.elementwise_affine:
        return "layernorm"
    if type(m) is nn.Embedding and m.max_norm is None and not m.scale_grad_by_freq:
        return "embedding"
    return None


def _no_vmap(m: nn.Module) -> str | None:
    """Why ``torch.func`` cannot give per-sample gradients of a module, or None."""
    if isinstance(m, (nn.RNN, nn.GRU)):
        return "its fused recurrent kernel does not run under torch.func.vmap"
    if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None:
        return "max_norm renormalises the table in place during the forward pass"
    return None


@dataclass
class Plan:
    """Which selected parameters go through hooks (by module) and which through ``torch.func``.

    ``rerouted``: parameters that a hookable module owns but that go through ``torch.func``
    because the self-check found that the hooks miss part of their gradient (name -> why).
    """

    hooked: dict[str, str]  # module name -> kind
    func: list[str]  # parameter names
    unsupported: dict[str, str]  # module name -> type name, for modules whose params use func
    rerouted: dict[str, str] = field(default_factory=dict)


def _param_names(model: nn.Module) -> dict[int, str]:
    """Canonical name of every parameter by identity (tied ones under their first name)."""
    return {id(p): n for n, p in model.named_parameters()}


def _own(m: nn.Module, canon: dict[int, str], selected: set[str]) -> dict[str, str]:
    """A module's own (direct) selected parameters: {attribute, e.g. "weight": name}."""
    names = {a: canon.get(id(p)) for a, p in m._parameters.items() if p is not None}
    return {a: n for a, n in names.items() if n in selected}


def make_plan(task: Task, rerouted: dict[str, str] | None = None) -> Plan:
    """Route each selected parameter.

    A parameter goes through hooks only if every module that owns it (tied weights have several
    owners) is hookable and it is not in ``rerouted`` (name -> why, from the self-check);
    otherwise through ``torch.func``. A hookable module is hooked when at least one of its own
    parameters is selected and none of them is routed to ``torch.func``. A selected parameter
    of a module that ``torch.func`` cannot differentiate per sample (GRU, an embedding with
    ``max_norm``) is refused with a ValueError naming the module.
    """
    rerouted = dict(rerouted or {})
    selected = {p.name for p in task.params}
    canon = _param_names(task.model)
    owners: dict[str, list[tuple[str, nn.Module]]] = defaultdict(list)
    for mname, m in task.model.named_modules(remove_duplicate=False):
        for pname in _own(m, canon, selected).values():
            owners[pname].append((mname, m))
    func: set[str] = set(rerouted) & selected
    unsupported: dict[str, str] = {}
    for pname, mods in owners.items():
        for mname, m in mods:
            if not _hookable(m):
                func.add(pname)
                unsupported[mname] = type(m).__name__
            elif (attr := pname.rsplit(".", 1)[-1]) not in ("weight", "bias"):
                # e.g. weight_g / weight_v of torch.nn.utils.weight_norm: no factored rule
                func.add(pname)
                unsupported[mname] = f"{type(m).__name__} with parameter {attr!r}"
    # A hookable module with one parameter on the torch.func path sends all of its parameters
    # there (its hook would otherwise miss them); that can spread to their other owners.
    changed = True
    while changed:
        changed = False
        for mods in owners.values():
            for _, m in mods:
                own = set(_own(m, canon, selected).values())
                if own & func and not own <= func:
                    func |= own
                    changed = True
    for pname in sorted(func):
        for mname, m in owners.get(pname, []):
            if why := _no_vmap(m):
                raise ValueError(
                    f"module {mname!r} ({type(m).__name__}) has no exact per-sample gradient in "
                    f"dropinf: it is not a hooked layer and {why}. Leave its parameters out of "
                    f"Task(params=...) (e.g. params=[names without {mname!r}]), or use a module "
                    "that torch.func supports (nn.LSTM, an embedding without max_norm)"
                )
    hooked: dict[str, str] = {}
    seen: set[int] = set()
    for mname, m in task.model.named_modules(remove_duplicate=False):
        kind = _hookable(m)
        own = set(_own(m, canon, selected).values())
        if kind and own and not own & func and id(m) not in seen:
            hooked[mname] = kind
            seen.add(id(m))
    func_list = [p.name for p in task.params if p.name in func]  # layout order
    why = {n: rerouted[n] for n in func_list if n in rerouted}
    return Plan(hooked, func_list, unsupported, why)



@dataclass(frozen=True)
class FactorSpec:
    """A layer whose per-sample gradient compressors may form from its factors.

    The layer's (augmented) weight is an ``(n_out, n_in + has_bias)`` matrix: output units by
    input units, the bias being the last input unit. A grouped convolution is one such matrix
    whose output rows are split among the groups, each over the same ``n_in`` local inputs.
    """

    module: str
    weight: str | None
    bias: str | None
    n_in: int
    n_out: int
    transposed: bool = False

    @property
    def n_in_aug(self) -> int:
        return self.n_in + (self.bias is not None)

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(p for p in (self.weight, self.bias) if p is not None)


def factor_specs(task: Task, plan: Plan | None = None) -> list[FactorSpec]:
    """Layers (in model order) whose parameters no other hooked module shares.

    A parameter shared with another hooked module (GPT-2's ``lm_head`` tied to ``wte``) is not
    listed: compressors treat it as a plain parameter, summing all its contributions first.
    """
    plan = plan or make_plan(task)
    selected = {p.name for p in task.params}
    canon = _param_names(task.model)
    modules = dict(task.model.named_modules(remove_duplicate=False))
    users: dict[str, int] = defaultdict(int)
    for name in plan.hooked:
        for pname in _own(modules[name], canon, selected).values():
            users[pname] += 1
    specs = []
    for name, kind in plan.hooked.items():
        if kind not in ("linear", "conv1d", "conv2d"):
            continue
        m = modules[name]
        own = _own(m, canon, selected)
        w, b = own.get("weight"), own.get("bias")
        # Without its weight a layer has no factored gradient (a selected bias alone is flat).
        if w is None or any(users[p] > 1 for p in (w, b) if p is not None):
            continue
        if kind == "linear":
            n_in, n_out = m.in_features, m.out_features
        elif kind == "conv1d":
            n_in, n_out = m.weight.shape
        else:  # (C_out, C_in / groups, kh, kw)
            n_in, n_out = m.weight[0].numel(), m.out_channels
        specs.append(FactorSpec(name, w, b, n_in, n_out, kind == "conv1d"))
    return specs
