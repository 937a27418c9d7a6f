"""spectrawatch: watch neural-network training from the inside.

```python
from spectrawatch import monitor
monitor.init(project="grok", run="p97-wd1")      # or SPECTRAWATCH_* env
monitor.attach(model, optimizer, probe=batch)
monitor.log({"loss": loss}, step=t)
monitor.finish()
```

``spectrawatch.Api`` reads results back (runs, metric series, alerts; :mod:`spectrawatch.api`).

``spectrawatch.monitor`` is the default :class:`Monitor` *instance* (it shadows the submodule of
the same name, which stays importable as ``from spectrawatch.monitor import Monitor``).
"""

from __future__ import annotations

from spectrawatch._version import __version__
from spectrawatch.api import Api
from spectrawatch.config import ClientSettings, SettingsError
from spectrawatch.monitor import Handle, Monitor
from spectrawatch.monitor import monitor as monitor

__all__ = [
    "Api",
    "ClientSettings",
    "Handle",
    "Monitor",
    "SettingsError",
    "__version__",
    "monitor",
]
