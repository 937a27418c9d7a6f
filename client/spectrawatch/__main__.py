"""``python -m spectrawatch`` runs the command line."""

from spectrawatch.cli import main

raise SystemExit(main())
