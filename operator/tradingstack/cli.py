"""The `tradingstack` command: crd, render, operator."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from tradingstack import api
from tradingstack.crd import crd_yaml
from tradingstack.plan import InvalidSpecError, StackRef, build_plan, parse_spec

if TYPE_CHECKING:  # the backends pull in pyarrow and deltalake: only the commands that use them import them
    from tradingstack.backends import StackCredentials


def load_stacks(path: str) -> list[dict[str, Any]]:
    text = sys.stdin.read() if path == "-" else Path(path).read_text()
    docs = [d for d in yaml.safe_load_all(text) if d]
    stacks = [d for d in docs if d.get("kind") == api.KIND]
    if not stacks:
        raise InvalidSpecError(f"{path}: no {api.KIND} object found")
    for doc in stacks:
        if doc.get("apiVersion") != api.API_VERSION:
            raise InvalidSpecError(f"{path}: apiVersion must be {api.API_VERSION}, not {doc.get('apiVersion')!r}")
        if not (doc.get("metadata") or {}).get("name"):
            raise InvalidSpecError(f"{path}: metadata.name is required")
    return stacks


def cmd_crd(args: argparse.Namespace) -> int:
    text = crd_yaml()
    if args.check:
        current = Path(args.check).read_text() if Path(args.check).exists() else ""
        if current != text:
            print(f"{args.check} is out of date: run `tradingstack crd > {args.check}`", file=sys.stderr)
            return 1
        return 0
    sys.stdout.write(text)
    return 0


def cmd_render(args: argparse.Namespace) -> int:
    objects: list[dict[str, Any]] = []
    for doc in load_stacks(args.file):
        meta = doc["metadata"]
        stack = StackRef(name=meta["name"], namespace=args.namespace or meta.get("namespace") or "default")
        objects += build_plan(stack, parse_spec(doc.get("spec"))).objects
    sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False))
    return 0


def _env_credentials() -> StackCredentials:
    """Outside Kubernetes, credentials come from the environment, read as the services read it (the
    AWS variables for S3; NATS_USER, NATS_PASSWORD, NATS_TOKEN, NATS_CA_FILE, QUESTDB_... for the rest)."""
    from tradingstack.backends import StackCredentials
    from tradingstack.backends.s3 import S3Credentials
    from tradingstack_services.platform.settings import ServiceSettings

    env = ServiceSettings(SERVICE_NAME="provision")
    key, secret = env.AWS_ACCESS_KEY_ID, env.AWS_SECRET_ACCESS_KEY
    return StackCredentials(
        s3=S3Credentials(key, secret) if key and secret else None,
        nats=env.nats_credentials(),
        questdb=env.questdb_credentials(),
    )


def _infrastructure(args: argparse.Namespace, dry_run: bool, fail_on_drift: bool) -> int:
    """Shared by provision and check: run every backend for every stack in the file, report."""
    from tradingstack import backends

    clean = True
    for doc in load_stacks(args.file):
        meta = doc["metadata"]
        plan = build_plan(StackRef(meta["name"], meta.get("namespace") or "default"), parse_spec(doc.get("spec")))
        for provisioner in backends.provisioners(plan, _env_credentials()):
            result = backends.run(provisioner, plan, dry_run=dry_run)
            verb = "would" if dry_run else "did"
            for change in result.changes:
                print(f"{meta['name']}: {result.backend}: {verb} {change}")
            for problem in result.problems:
                print(f"{meta['name']}: {result.backend}: {problem.reason}: {problem}", file=sys.stderr)
            if result.unreachable:
                print(f"{meta['name']}: {result.backend}: unreachable: {result.unreachable}", file=sys.stderr)
            if not result.changes and result.ok:
                print(f"{meta['name']}: {result.backend}: in sync")
            healthy = result.unreachable is None and not result.problems
            clean = clean and healthy and not (fail_on_drift and result.changes)
    return 0 if clean else 1


def cmd_provision(args: argparse.Namespace) -> int:
    return _infrastructure(args, dry_run=args.dry_run, fail_on_drift=False)


def cmd_check(args: argparse.Namespace) -> int:
    """Exit 1 when anything drifted, is missing, unreachable or cannot be fixed."""
    return _infrastructure(args, dry_run=True, fail_on_drift=True)


def cmd_wait(args: argparse.Namespace) -> int:
    """Wait until a TradingStack is Ready; print its conditions either way."""
    import time

    from tradingstack.kubeclient import KubeClient

    kube = KubeClient.from_environment()
    deadline = time.monotonic() + args.timeout
    conditions: list[dict[str, Any]] = []
    try:
        while True:
            stack = kube.get(api.KIND, args.namespace, args.name)
            if stack is None:
                print(f"{api.KIND} {args.namespace}/{args.name} not found", file=sys.stderr)
            else:
                conditions = (stack.get("status") or {}).get("conditions") or []
                ready = next((c for c in conditions if c.get("type") == "Ready"), {})
                if ready.get("status") == "True":
                    print(f"{args.namespace}/{args.name} is Ready: {ready.get('message', '')}")
                    return 0
            if time.monotonic() >= deadline:
                break
            time.sleep(2)
    finally:
        kube.close()
    print(f"{args.namespace}/{args.name} not Ready after {args.timeout}s", file=sys.stderr)
    for cond in conditions:
        print(f"  {cond['type']}={cond['status']} ({cond.get('reason')}): {cond.get('message', '')}", file=sys.stderr)
    return 1


def cmd_service(args: argparse.Namespace) -> int:
    from tradingstack_services.platform import runner

    try:
        if args.help:
            print(runner.describe(args.name))
            return 0
        runner.serve(args.name)
    except (LookupError, runner.SettingsError) as exc:  # a usage error: exit 2, as argparse's own
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_operator(args: argparse.Namespace) -> int:
    import kopf
    from prometheus_client import start_http_server

    import tradingstack.handlers  # noqa: F401  (registers the handlers)

    if not args.all_namespaces and not args.namespace:
        print("give --namespace NS (repeatable) or --all-namespaces", file=sys.stderr)
        return 2
    if args.allowed_image_repository:
        import os

        from tradingstack.images import ALLOWED_ENV

        os.environ[ALLOWED_ENV] = ",".join(args.allowed_image_repository)  # read by the startup handler
    kopf.configure(log_format=kopf.LogFormat.JSON if args.log_format == "json" else kopf.LogFormat.FULL)
    if args.manage_crd:
        from tradingstack import crd
        from tradingstack.kubeclient import KubeClient

        kube = KubeClient.from_environment()
        try:
            logging.getLogger("tradingstack.crd").info(crd.ensure(kube))
        finally:
            kube.close()
    if args.metrics_port:
        start_http_server(args.metrics_port)
    kopf.run(
        standalone=True,
        clusterwide=args.all_namespaces,
        namespaces=args.namespace or [],
        liveness_endpoint=args.liveness,
    )
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="tradingstack", description=__doc__)
    sub = top.add_subparsers(dest="command", required=True)

    crd = sub.add_parser("crd", help="print the CustomResourceDefinition generated from the API model")
    crd.add_argument("--check", metavar="FILE", help="exit 1 when FILE differs from the generated CRD")
    crd.set_defaults(func=cmd_crd)

    render = sub.add_parser("render", help="print the Kubernetes objects a TradingStack becomes")
    render.add_argument("-f", "--file", required=True, help="TradingStack YAML file, or - for stdin")
    render.add_argument("-n", "--namespace", help="namespace to render into (default: the object's)")
    render.set_defaults(func=cmd_render)

    provision = sub.add_parser(
        "provision", help="create or repair the streams, buckets and tables of a TradingStack file, no Kubernetes"
    )
    provision.add_argument("-f", "--file", required=True, help="TradingStack YAML file, or - for stdin")
    provision.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    provision.set_defaults(func=cmd_provision)

    check = sub.add_parser("check", help="exit 1 and say what drifted when the infrastructure is not as declared")
    check.add_argument("-f", "--file", required=True, help="TradingStack YAML file, or - for stdin")
    check.set_defaults(func=cmd_check)

    wait = sub.add_parser("wait", help="wait until a TradingStack is Ready (exit 1 on timeout)")
    wait.add_argument("name", help="TradingStack name")
    wait.add_argument("-n", "--namespace", default="default", help="its namespace")
    wait.add_argument("--timeout", type=float, default=300, help="seconds to wait")
    wait.set_defaults(func=cmd_wait)

    service = sub.add_parser("service", help="run one service (the container entrypoint of every service)",
                             add_help=False)  # fmt: skip
    service.add_argument("name", help="gateway, normalizer, sink-ticks, sink-alt, risk, oms, exeq or pnl")
    service.add_argument("-h", "--help", action="store_true", help="list the service's settings and defaults")
    service.set_defaults(func=cmd_service)

    op = sub.add_parser("operator", help="run the operator")
    scope = op.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", help="namespace to watch (repeatable)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace")
    op.add_argument("--liveness", default="http://0.0.0.0:8080/healthz", help="liveness endpoint URL")
    op.add_argument("--metrics-port", type=int, default=9090, help="Prometheus port (0 to disable)")
    op.add_argument("--log-format", choices=["json", "text"], default="json", help="log line format")
    op.add_argument("--allowed-image-repository", action="append", metavar="REPO",
                    help="run only images from REPO or below it (repeatable); others are refused, "
                         "Degraded/ImageNotAllowed")  # fmt: skip
    op.add_argument("--manage-crd", action="store_true",
                    help="apply this version's TradingStack CRD at start (unless the cluster's is newer): "
                         "helm upgrade leaves a chart's crds/ as they were")  # fmt: skip
    op.set_defaults(func=cmd_operator)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command not in ("operator", "service"):  # both configure their own (JSON) logging
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    try:
        result: int = args.func(args)
    except InvalidSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return result


if __name__ == "__main__":
    sys.exit(main())
