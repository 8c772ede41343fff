"""``python -m ckptguard ...``: the ``ckptguard`` command (ls, verify, doctor, prune, report, train, ...)."""

import sys

from ckptguard.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
