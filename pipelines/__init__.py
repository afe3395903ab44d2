"""Inference side: fastgen's samplers, export to built-in diffusers pipelines, and ``FewStepPipeline``.

``from fastgen.pipelines import FewStepPipeline`` imports diffusers only when the name is first used.
"""


def __getattr__(name: str):
    if name == "FewStepPipeline":
        from .fewstep import FewStepPipeline

        return FewStepPipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["FewStepPipeline"]
