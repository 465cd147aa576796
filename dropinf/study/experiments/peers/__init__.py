"""Notebook 07 (peers): dropinf beside dattri, TRAK, kronfluence and LogIX.

:mod:`.experiment` holds the experiment (``Config``, ``run``, ``summary``, ``conclusions``,
``plot_pareto``), re-exported here; :mod:`.adapters` one adapter per peer library.
"""

from . import adapters
from .experiment import (
    PROFILES,
    TASKS,
    Config,
    Result,
    build_task,
    conclusions,
    conv1d_to_linear,
    dominating,
    dropinf_points,
    measure,
    pareto_front,
    peer_points,
    plot_pareto,
    run,
    summary,
    table,
    task_table,
    verdict_table,
)

__all__ = ["PROFILES", "TASKS", "Config", "Result", "adapters", "build_task", "conclusions",
           "conv1d_to_linear", "dominating", "dropinf_points", "measure", "pareto_front",
           "peer_points", "plot_pareto", "run", "summary", "table", "task_table",
           "verdict_table"]
