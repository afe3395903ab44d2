"""fastgen: diffusion step-distillation on Hugging Face diffusers.

Core pieces shared by every method (no file I/O, no command-line parsing):

* :mod:`fastgen.schedule` -- noise schedules and parameterisation conversions.
* :mod:`fastgen.denoiser` -- a diffusers network + its schedule + conditioning + guidance.
* :mod:`fastgen.zoo` -- tiny real teachers shipped with the package.
"""

__version__ = "0.1.0"
