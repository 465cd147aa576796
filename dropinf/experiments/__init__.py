"""The computations behind the study's notebooks, one module per notebook (tested in ``tests/``).

Notebooks stay thin: they build a module's ``Config`` for a profile, call its functions, plot
and save through :class:`dropinf.results.Run`.
"""
