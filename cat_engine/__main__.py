"""``python -m cat_engine COMMAND ...``: the same as ``cat-engine COMMAND ...`` (torchrun starts ranks this way)."""

import sys

from cat_engine.cli import main

sys.exit(main())
