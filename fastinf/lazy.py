"""Package namespaces that import their public names on first use.

`fastinf` and `fastinf.index` export names from modules that load torch, diffusers and
faiss; importing them lazily lets the command line parse arguments, print `--help` and
report argument errors without paying for those imports.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable, Callable]:
    """`(__getattr__, __dir__)` for a package whose public names live in its modules.

    Args:
        package: the package's `__name__`.
        exports: public name → the submodule (relative to `package`) that defines it.
    """
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{exports[name]}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
