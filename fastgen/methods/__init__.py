"""Distillation methods: one module per family, all with the interface of :mod:`.base`."""

from .base import Batch, DistillationMethod, StepOutput, frozen, make_student, student_parameters
from .dmd import DMD, DMD2

METHODS = {"dmd": DMD, "dmd2": DMD2}

__all__ = ["Batch", "DistillationMethod", "StepOutput", "frozen", "make_student", "student_parameters", "DMD", "DMD2",
           "METHODS"]
