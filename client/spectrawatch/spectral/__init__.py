"""Pure spectral math: tensors in, frozen dataclasses / numbers out. No I/O, no project imports.

Modules: ``sed`` (spectral edge dynamics), ``grokking`` (early warning), ``htsr`` (heavy-tail
weight metrics) built on ``esd`` (weight matrices and their ESDs), ``power_law`` (WWFit, Hill),
``marchenko_pastur`` (MP fit), ``traps`` (correlation traps), ``histograms`` and ``errors``
(``SpectralError``), ``farms`` (fixed-aspect-ratio sampling), ``activations`` (EigenTrack),
``polar`` (Polar Express), ``conditioning`` (GMCN, PC layers), ``subspace`` (spike-subspace
drift), ``manifold`` (quadratic fit), ``norms``; ``keys`` lists the metric keys they define.
"""

from spectrawatch.spectral.htsr import analyze_model

__all__ = ["analyze_model"]
