"""Build shim: the entry points come from entry_points.toml, all else from pyproject.toml."""

import tomllib
from pathlib import Path

from setuptools import setup


def read_entry_points() -> dict[str, list[str]]:
    table = tomllib.loads((Path(__file__).parent / "entry_points.toml").read_text())
    return {group: [f"{name} = {target}" for name, target in items.items()] for group, items in table.items()}


setup(entry_points=read_entry_points())
