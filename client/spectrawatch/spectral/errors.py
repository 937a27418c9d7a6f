"""The one exception of the HT-SR math: an ESD or weight that cannot be analysed.

Raised by :mod:`~spectrawatch.spectral.power_law`, :mod:`~spectrawatch.spectral.marchenko_pastur`,
:mod:`~spectrawatch.spectral.histograms`, :mod:`~spectrawatch.spectral.traps` and
:mod:`~spectrawatch.spectral.htsr` (which re-exports it); it lives here, below all of them,
so that each can import it without a cycle. A ``ValueError``, where WeightWatcher returns -1.
"""

from __future__ import annotations


class SpectralError(ValueError):
    """An ESD that cannot be analysed (too few positive eigenvalues, non-finite weights...)."""
