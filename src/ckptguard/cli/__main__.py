"""``python -m ckptguard.cli.main ...``: the same command as ``ckptguard``."""

import sys

from ckptguard.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
