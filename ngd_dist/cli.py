"""The ``ngd-dist`` command line."""

from __future__ import annotations

import argparse
import sys

from ngd_dist.config import CURVATURES


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``ngd-dist`` and its subcommands."""
    parser = argparse.ArgumentParser(prog="ngd-dist", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    quick = sub.add_parser("quickstart", help="train an MLP on the embedded digits data with K-FAC")
    quick.add_argument("--steps", type=_positive_int, default=60)
    quick.add_argument("--batch-size", type=_positive_int, default=512)
    quick.add_argument("--lr", type=float, default=0.1)
    quick.add_argument("--curvature", choices=CURVATURES, default="ief")
    quick.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ngd-dist`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "quickstart":
        from ngd_dist.train.quickstart import run_quickstart

        result = run_quickstart(
            steps=args.steps, batch_size=args.batch_size, lr=args.lr, curvature=args.curvature, seed=args.seed
        )
        return 0 if result.losses[-1] < result.losses[0] else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
