"""``python -m ckptguard.train [--config run.toml] [--set key=value ...] [--resume auto|none|PATH]``.

The same as ``ckptguard train``; torchrun can launch it as ``torchrun ... -m ckptguard.train``.
"""

import argparse
import logging
import sys

from ckptguard.train.commands import add_train_arguments, cmd_train


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m ckptguard.train", description="LoRA fine-tuning with ckptguard")
    add_train_arguments(parser)
    return cmd_train(parser.parse_args())


if __name__ == "__main__":
    sys.exit(main())
