"""``python -m cat_engine.bench``: the same as ``cat-engine bench``."""

import sys

from cat_engine.cat.cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
