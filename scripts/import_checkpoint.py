"""Imports an official DiT, SiT or REPA state dict saved under another file name as a checkpoint of
this repository, with its config (prediction type and time convention), so that every script reads
them from the file. SiT's weights use DiT's module names and cannot be told apart from DiT's by
their shapes: say whose they are.

    python scripts/import_checkpoint.py --family sit my-sit.pt pretrained_models/sit-imported.pt
"""

import argparse
import os
import sys

# the repository root
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ard import cli  # noqa: E402
from ard.checkpoints import FAMILIES, import_official  # noqa: E402
from ard.cli import UserError, check_output_path  # noqa: E402


def main(args):
    if os.path.exists(args.dst):
        raise UserError(f"{args.dst} exists: pick another destination")
    check_output_path(args.dst, "the destination")
    print(f"wrote {args.dst}: {import_official(args.src, args.family, args.dst)}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--family",
        type=str,
        choices=list(FAMILIES),
        required=True,
        help="whose checkpoint it is (SiT's and DiT's cannot be told apart by their weights)",
    )
    parser.add_argument("src", type=str, help="the bare state dict")
    parser.add_argument("dst", type=str, help="the checkpoint to write")
    return parser.parse_args(argv)


if __name__ == "__main__":
    cli.run(main, parse_args)
