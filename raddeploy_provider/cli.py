"""The ``raddeploy`` command. Airflow is imported lazily: ``listen`` and ``validate`` never need it."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from raddeploy_provider.config import load_settings


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_listen(args: argparse.Namespace) -> int:
    from listener.service import serve

    serve(load_settings())
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from raddeploy_provider.flows import load_flows

    paths = args.paths or [load_settings().flows_dir]
    problems = 0
    for path in paths:
        result = load_flows(Path(path))
        for flow in result.flows:
            print(f"ok: {flow.source}: {flow.dag_id} ({len(flow.triggers)} triggers, {len(flow.models)} models, "
                  f"{len(flow.destinations)} destinations)")
        for error in result.errors:
            print(f"error: {error}")
        problems += len(result.errors)
    return 1 if problems else 0


def cmd_run(args: argparse.Namespace) -> int:
    from raddeploy_provider.embedded import EmbeddedStack

    stack = EmbeddedStack(home=Path(args.home).absolute(), flows_dir=Path(args.flows).absolute(),
                          api_port=args.api_port, dicom_port=args.port, ae_title=args.ae_title,
                          listener_output=sys.stdout.fileno())
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"starting Airflow (logs: {stack.logs_dir}/airflow.log) ...", flush=True)
    stack.start()
    password = stack.passwords()["admin"]
    print(f"""
raddeploy is running.
  Airflow UI:   {stack.api_url}   user admin, password {password}
  DICOM:        AE title {args.ae_title}, port {args.port}   (try: TCP_NODELAY=1 echoscu -aec {args.ae_title} localhost {args.port})
  flows:        {stack.flows_dir}
  data:         {stack.data_dir}
Ctrl-C stops everything.
""", flush=True)
    stop.wait()
    print("stopping ...", flush=True)
    stack.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raddeploy", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("listen", help="run the DICOM listener (RADDEPLOY_* settings)")
    p.set_defaults(func=cmd_listen)

    p = sub.add_parser("validate", help="check flow files; exit 1 if any is invalid")
    p.add_argument("paths", nargs="*", help="flow files or folders (default: RADDEPLOY_FLOWS)")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("run", help="the embedded default: Airflow standalone + listener, in the foreground")
    p.add_argument("--home", default=".raddeploy", help="state folder (default: .raddeploy)")
    p.add_argument("--flows", default="flows", help="flows folder (default: flows)")
    p.add_argument("--port", type=int, default=11112, help="DICOM port (default: 11112)")
    p.add_argument("--ae-title", default="RADDEPLOY")
    p.add_argument("--api-port", type=int, default=8080, help="Airflow API/UI port (default: 8080)")
    p.set_defaults(func=cmd_run)

    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
