"""``python -m ace_model``: the ``ace-lora`` command line (:mod:`ace_model.cli`)."""

import sys

from ace_model.cli import main

if __name__ == "__main__":
    sys.exit(main())
