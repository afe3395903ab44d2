"""``python -m fastgen.cli``: the ``fastgen`` command (what ``accelerate launch -m fastgen.cli`` runs)."""

import sys

from . import main

sys.exit(main())
