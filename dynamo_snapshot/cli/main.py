"""`dynamo-snapshot`: the operator process and the local demo."""

from __future__ import annotations

import argparse
import sys

from dynamo_snapshot import __version__
from dynamo_snapshot.controllers.entry import add_arguments
from dynamo_snapshot.controllers.entry import run as run_operator


def _demo(args: argparse.Namespace) -> int:
    try:
        from dynamo_snapshot.cli.demo import run_demo
    except ModuleNotFoundError as err:
        if err.name != "cryptography":
            raise
        print(f"error: {err.msg}", file=sys.stderr)
        return 2

    return run_demo(keep=args.keep, workdir=args.workdir, storage="s3" if args.s3 else "agentMount")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynamo-snapshot", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dynamo-snapshot {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    operator = commands.add_parser(
        "operator", help="run the checkpoint, PVC and DGD controllers (in a cluster or against a kubeconfig)"
    )
    add_arguments(operator)
    operator.set_defaults(func=run_operator)

    demo = commands.add_parser(
        "demo", help="bring up the embedded local control plane and run the checkpoint flow on it"
    )
    demo.add_argument("--keep", action="store_true", help="leave the cluster running and print its kubeconfig")
    demo.add_argument("--workdir", default=".local/cluster", help="where the cluster keeps its state")
    demo.add_argument("--s3", action="store_true",
                      help="keep checkpoints in object storage: a MinIO on loopback (hack/build-minio.sh builds it)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
