"""The operator's command line: `python -m dynamo_snapshot.controllers` and `dynamo-snapshot operator`.

Stages: parse the flags, load the operator configuration and the cluster configuration (a missing or
broken file is a usage error: one line naming it, exit 2, before anything starts), then run the
controllers until a stop signal.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG, in-cluster, ~/.kube/config)")
    parser.add_argument("--config", help="operator configuration file (the `checkpoint:` block)")
    parser.add_argument("--namespace", help="watch only this namespace (default: all)")
    parser.add_argument("--leader-elect", action="store_true", help="run only while holding the leader Lease")
    parser.add_argument("--leader-election-namespace", help="namespace of the leader Lease (default: own)")
    parser.add_argument("--leader-election-id", default="dynamo-snapshot-operator", help="leader Lease name")
    parser.add_argument("--metrics-bind-address", default=":8080", help="serve /metrics here (0: off)")
    parser.add_argument("--health-probe-bind-address", default=":8081", help="serve /healthz and /readyz here")
    parser.add_argument("--workers", type=int, default=4, help="reconcile workers per controller")
    parser.add_argument("--log-level", default=None, help="debug, info, warning, error")


def run(args: argparse.Namespace) -> int:
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
        operator = Operator(options)
    except InvalidObject as err:
        print(f"error: invalid operator configuration: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot read the operator configuration {args.config}: {err.strerror or err}",
              file=sys.stderr)
        return 2
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        try:
            anyio.run(run_until_signalled, operator.run)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dynamo_snapshot.controllers",
        description="run the checkpoint, PVC and DGD controllers (in a cluster or against a kubeconfig)")
    add_arguments(parser)
    return run(parser.parse_args(argv))
