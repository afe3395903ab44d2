"""fastgen: diffusion step-distillation on Hugging Face diffusers.

The Python API (loaded on first use, so ``import fastgen`` imports neither torch nor diffusers):

* ``fastgen.train(recipe, out=..., overrides=..., resume=...)`` -- distill and export a student;
* ``fastgen.evaluate(target, ...)`` -- generate and score; returns the metrics;
* ``fastgen.export(run_or_checkpoint, out=...)`` -- export a run's student without training;
* the pipelines: ``fastgen.FewStepPipeline`` (where installed), ``fastgen.PipelineSampler``,
  ``fastgen.export_student``, ``fastgen.load_pipeline``.

Core pieces shared by every method (no file I/O, no command-line parsing):

* :mod:`fastgen.schedule` -- noise schedules and parameterisation conversions.
* :mod:`fastgen.denoiser` -- a diffusers network + its schedule + conditioning + guidance.
* :mod:`fastgen.zoo` -- tiny real teachers shipped with the package.
"""

import importlib

__version__ = "0.1.0"

# name -> the module it lives in. ``train`` is the subpackage fastgen.train itself, which is callable (see
# train/__init__.py): a function of that name here would be replaced by the subpackage once it is imported.
_LAZY = {"train": "fastgen.train", "evaluate": "fastgen.cli.api", "export": "fastgen.cli.api",
         "FewStepPipeline": "fastgen.pipelines", "PipelineSampler": "fastgen.pipelines.generate",
         "export_student": "fastgen.pipelines.export", "load_pipeline": "fastgen.pipelines.loading"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'fastgen' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if name == "train" else getattr(module, name, None)
    if value is None:
        raise AttributeError(f"module 'fastgen' has no attribute {name!r} ({_LAZY[name]} does not define it)")
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_LAZY])
