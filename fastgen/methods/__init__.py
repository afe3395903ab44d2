"""Distillation methods: one module per method, each registered by name (see :mod:`.base` for the contract).

``get_method("dmd2")`` returns a method class; :func:`method_names` lists them. The shipped methods live
in this package and register themselves when imported; a method defined elsewhere registers with
:func:`register` and is then usable by name in recipes like the shipped ones.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import (METHODS, Batch, DataNeeds, DistillationMethod, ExportSpec, OptimizerOptions, StepOutput,
                   StudentOptions, TeacherPairs, frozen, make_student, register, student_parameters)

_NOT_METHODS = {"base", "common", "distribution_matching", "guidance"}


def _import_shipped() -> None:
    """Import every method module of this package (each registers its methods)."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _NOT_METHODS:
            importlib.import_module(f"{__name__}.{info.name}")


def method_names() -> list[str]:
    """The names of every registered method."""
    _import_shipped()
    return sorted(METHODS)


def get_method(name: str) -> type[DistillationMethod]:
    """The method class registered as ``name``; a ``KeyError`` naming the valid ones otherwise."""
    if name not in METHODS:
        _import_shipped()
    if name not in METHODS:
        raise KeyError(f"Unknown method {name!r}; available: {', '.join(sorted(METHODS))}.")
    return METHODS[name]


def __getattr__(name: str):
    """``from fastgen.methods import DMD2``: the shipped method classes, imported on first use."""
    _import_shipped()
    for cls in METHODS.values():
        if cls.__name__ == name:
            return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Batch", "DataNeeds", "DistillationMethod", "ExportSpec", "OptimizerOptions", "StepOutput",
           "StudentOptions", "TeacherPairs", "frozen", "make_student", "register", "student_parameters", "METHODS",
           "get_method", "method_names"]
