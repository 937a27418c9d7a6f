"""spectrawatch server: ingest API, storage, analysis worker, alerts, webhooks, dashboards."""

from spectrawatch._version import __version__

__all__ = ["__version__"]
