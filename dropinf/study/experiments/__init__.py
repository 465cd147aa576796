"""The computations behind the study's notebooks, one module per notebook (tested in ``tests/``),
and what they share: :mod:`.methods` (the compared methods: names, labels, colours, matched
dimension, construction), :mod:`.common` (named random streams, threads, config helpers) and
:mod:`.measure` (time, memory and machine-load measurements).

Notebooks stay thin: they build a module's ``Config`` for a profile, call its functions, plot
and save through :class:`dropinf.study.results.Run`.
"""
