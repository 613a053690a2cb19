"""`dynamo-snapshot`: the operator process and the local demo."""

from __future__ import annotations

import argparse
import sys

from dynamo_snapshot import __version__


def _demo(args: argparse.Namespace) -> int:
    from dynamo_snapshot.cli.demo import run_demo

    return run_demo(keep=args.keep, workdir=args.workdir)


def _operator(args: argparse.Namespace) -> int:
    import anyio

    from dynamo_snapshot import logs
    from dynamo_snapshot.api import InvalidObject
    from dynamo_snapshot.controllers.operator import Operator, OperatorOptions
    from dynamo_snapshot.kube import ConfigError, KubeError
    from dynamo_snapshot.lifecycle import run_until_signalled

    logs.configure(args.log_level)
    options = OperatorOptions(
        kubeconfig=args.kubeconfig,
        config_path=args.config,
        namespace=args.namespace,
        leader_elect=args.leader_elect,
        leader_election_namespace=args.leader_election_namespace,
        leader_election_id=args.leader_election_id,
        metrics_bind_address=args.metrics_bind_address,
        health_probe_bind_address=args.health_probe_bind_address,
        workers=args.workers,
    )
    try:
        try:
            anyio.run(run_until_signalled, Operator(options).run)
        except BaseExceptionGroup as group:  # a start-up error raised inside the signal handler's task group
            raise _single(group) from None
    except InvalidObject as err:
        print(f"error: invalid operator configuration: {err}", file=sys.stderr)
        return 2
    except ConfigError as err:  # the kubeconfig: a usage error
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KubeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


def _single(group: BaseExceptionGroup) -> BaseException:
    """The one error of a (nested) exception group, or the group itself when there are several."""
    while isinstance(group, BaseExceptionGroup) and len(group.exceptions) == 1:
        group = group.exceptions[0]
    return group


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dynamo-snapshot", description=__doc__)
    parser.add_argument("--version", action="version", version=f"dynamo-snapshot {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    operator = commands.add_parser(
        "operator", help="run the checkpoint, PVC and DGD controllers (in a cluster or against a kubeconfig)"
    )
    operator.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG, in-cluster, ~/.kube/config)")
    operator.add_argument("--config", help="operator configuration file (the `checkpoint:` block)")
    operator.add_argument("--namespace", help="watch only this namespace (default: all)")
    operator.add_argument("--leader-elect", action="store_true", help="run only while holding the leader Lease")
    operator.add_argument("--leader-election-namespace", help="namespace of the leader Lease (default: own)")
    operator.add_argument("--leader-election-id", default="dynamo-snapshot-operator", help="leader Lease name")
    operator.add_argument("--metrics-bind-address", default=":8080", help="serve /metrics here (0: off)")
    operator.add_argument("--health-probe-bind-address", default=":8081", help="serve /healthz and /readyz here")
    operator.add_argument("--workers", type=int, default=4, help="reconcile workers per controller")
    operator.add_argument("--log-level", default=None, help="debug, info, warning, error")
    operator.set_defaults(func=_operator)

    demo = commands.add_parser(
        "demo", help="bring up the embedded local control plane and run the checkpoint flow on it"
    )
    demo.add_argument("--keep", action="store_true", help="leave the cluster running and print its kubeconfig")
    demo.add_argument("--workdir", default=".local/cluster", help="where the cluster keeps its state")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
