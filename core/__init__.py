"""PromptDev engine: templates, executions, conversations, evaluations, analytics. Never imports Streamlit."""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Iterable


def import_optional(names: Iterable[str]) -> list[ModuleType]:
    """Import the named modules that exist (a missing one is skipped; an error inside one is raised)."""
    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
    return modules
