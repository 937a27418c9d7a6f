"""Every package in the tree ships in the wheel (pyproject lists them explicitly)."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_every_package_is_listed_in_pyproject() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for base, prefix in (("client", ""), ("server", "")):
        for init in (ROOT / base).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / base)
            found.add(prefix + ".".join(rel.parts))
    for folder in ("migrations", "dashboards"):
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join(("spectrawatch_server", folder, *rel.parts)))
    assert found <= listed, f"missing from pyproject packages: {sorted(found - listed)}"
    for package, folder in config["package-dir"].items():
        assert (ROOT / folder / "__init__.py").exists(), package


def test_migrations_ship_as_package_data() -> None:
    from importlib import resources

    versions = resources.files("spectrawatch_server.migrations") / "versions"
    assert any(p.name.endswith(".py") and p.name[0].isdigit() for p in versions.iterdir())
