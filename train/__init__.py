"""fastgen.train: the accelerate trainer, recipes, data, and the zoo teachers' own training.

The package is also the API function ``fastgen.train(recipe, out=..., overrides=..., resume=...)``: calling it
runs :func:`fastgen.cli.api.train`. (A function ``fastgen.train`` would be replaced by this subpackage as soon
as anything imports ``fastgen.train.<module>``, so the subpackage itself is made callable.)
"""

import sys
import types


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        from fastgen.cli.api import train

        return train(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
