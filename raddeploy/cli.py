"""The ``raddeploy`` command. Airflow is imported lazily: only ``run`` and a connection id need it."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from raddeploy_provider.config import configure_logging, load_settings
from raddeploy_provider.units import format_duration

if TYPE_CHECKING:
    from raddeploy_provider.dicom.scu import Node
    from raddeploy_provider.flows import Flow, FlowError, FlowWarning, LoadResult
    from raddeploy_provider.store import InstanceHeader


def cmd_listen(args: argparse.Namespace) -> int:
    from listener.service import serve

    serve(load_settings())
    return 0


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def _load(path: Path) -> LoadResult:
    """The flows under ``path`` (a file or a folder); a missing path is an error, not nothing."""
    from raddeploy_provider.flows import FlowError, FlowWarning, LoadResult, load_flows

    if not path.exists():
        return LoadResult(errors=[FlowError(path, None, "", "no such file or folder",
                                            "give a flow file or a folder of flow files")])
    try:
        result = load_flows(path)
    except OSError as exc:  # a file we may not read must not hide the others' report
        return LoadResult(errors=[FlowError(exc.filename or path, None, "",
                                            f"cannot be read: {exc.strerror or exc}", "check its permissions")])
    if path.is_dir() and not result.flows and not result.errors:
        result.warnings.append(FlowWarning(path, None, "", "no flow files (*.yaml, *.yml) in this folder",
                                           "check the path"))
    return result


def _problem(problem: FlowError | FlowWarning) -> dict:
    return {"file": str(problem.file), "line": problem.line, "field": problem.field,
            "message": problem.message, "hint": problem.hint}


def cmd_validate(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.paths] or [load_settings().flows_dir]
    results = [_load(path) for path in paths]
    flows = [flow for result in results for flow in result.flows]
    errors = [error for result in results for error in result.errors]
    warnings = [warning for result in results for warning in result.warnings]
    if args.json:
        print(json.dumps({
            "flows": [{"file": str(flow.source), "dag_id": flow.dag_id, "name": flow.name, "spelling": flow.spelling}
                      for flow in flows],
            "errors": [_problem(error) for error in errors],
            "warnings": [_problem(warning) for warning in warnings],
        }, indent=2))
    else:
        for result in results:
            for flow in result.flows:
                spelling = "; RadDeploy spelling: patterns match anywhere in a value" if flow.spelling == "raddeploy" else ""
                print(f"ok: {flow.source}: {flow.dag_id} ({_plural(len(flow.triggers), 'trigger')}, "
                      f"{_plural(len(flow.models), 'model')}, {_plural(len(flow.destinations), 'destination')}"
                      f"{spelling})")
            for error in result.errors:
                print(f"error: {error}")
            for warning in result.warnings:
                print(f"warning: {warning}")
        print(f"{_plural(len(flows), 'flow')} ok, {_plural(len(errors), 'error')}, "
              f"{_plural(len(warnings), 'warning')}")
    return 1 if errors else 0


def _load_one(path: Path) -> Flow | None:
    """The flow in one file, its warnings on stderr; None (errors on stderr) if it does not load."""
    if path.is_dir():
        print(f"error: {path}: is a folder; give one flow file", file=sys.stderr)
        return None
    result = _load(path)
    for error in result.errors:
        print(f"error: {error}", file=sys.stderr)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return result.flows[0] if result.flows else None


def _input_spec(flow: Flow) -> str:
    """The flow's ``input`` section in words: ``layout flat, whole series``."""
    whole = "whole series" if flow.input.whole_series else "matched instances only"
    return f"layout {'/'.join(flow.input.layout) or 'flat'}, {whole}"


def _unreadable(exc: Exception) -> str:
    from pydicom.errors import InvalidDicomError

    from raddeploy_provider.store import StoreError

    if isinstance(exc, InvalidDicomError):
        return "not a DICOM file (no 'DICM' prefix after the preamble)"
    if isinstance(exc, (StoreError, OSError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def cmd_match(args: argparse.Namespace) -> int:
    from raddeploy_provider.flows import explain
    from raddeploy_provider.flows.matching import select_inputs, unmet_triggers
    from raddeploy_provider.store.snapshot import input_path

    flow = _load_one(Path(args.flow))
    if flow is None:
        return 2
    folder = Path(args.dicom_dir)
    if not folder.exists():
        print(f"error: {folder}: no such file or folder", file=sys.stderr)
        return 2
    print(f"flow {flow.dag_id} ({flow.name}): {flow.source}")
    for i, trigger in enumerate(flow.triggers, 1):
        print(f"  trigger {i}: {trigger.describe()}")
    found, unreadable = read_dicom_folder(folder)
    studies = {uid: [(shown_name(folder, path), header) for path, header in items] for uid, items in found.items()}
    if not studies:
        print(f"\nno readable DICOM file under {folder}")

    runs = 0
    for study_uid, items in studies.items():
        print(f"\nstudy {study_uid}: {_plural(len(items), 'file')}")
        for shown, header in items:
            print(f"  {shown}")
            for i, trigger in enumerate(flow.triggers, 1):
                reasons = explain(trigger, header.tags)
                print(f"    trigger {i}: {'not satisfied' if reasons else 'satisfied'}")
                for reason in reasons:
                    print(f"      {reason}")
        unmet = unmet_triggers(flow, [header.tags for _, header in items])
        if not unmet:
            runs += 1
        print(f"  would run: {'no' if unmet else 'yes'}")
        for i in unmet:
            print(f"    unmet trigger {i + 1}: {flow.triggers[i].describe()}")
        chosen = select_inputs(flow, [(header.series_uid, header.tags) for _, header in items])
        sources: dict[str, list[str]] = {}  # relative input path -> the files that give it (copies: one)
        for index in chosen:
            shown, header = items[index]
            sources.setdefault(input_path(header, flow.input.layout).as_posix(), []).append(shown)
        print(f"  src: {_plural(len(sources), 'file')} ({_input_spec(flow)}), as the run's input/ would hold them")
        for name in sorted(sources):
            print(f"    {name}  <- {', '.join(sources[name])}")

    if unreadable:
        print(f"\nunreadable: {_plural(len(unreadable), 'file')}")
        for path, reason in unreadable:
            print(f"  {shown_name(folder, path)}: {reason}")
    return 0 if runs else 1


def read_dicom_folder(folder: Path) -> tuple[dict[str, list[tuple[Path, InstanceHeader]]], list[tuple[Path, str]]]:
    """Every file under ``folder`` (or the one file) by study UID, in file order, with its header; and
    the files that are not readable DICOM with the reason. Shared by ``match`` and ``try``."""
    from raddeploy_provider.store import read_header

    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())
    studies: dict[str, list[tuple[Path, InstanceHeader]]] = {}
    unreadable: list[tuple[Path, str]] = []
    for path in files:
        try:
            header = read_header(path)
        except Exception as exc:  # any file may lie in the folder; say why, never crash
            unreadable.append((path, _unreadable(exc)))
            continue
        studies.setdefault(header.study_uid, []).append((path, header))
    return studies, unreadable


def shown_name(folder: Path, path: Path) -> str:
    """A file as ``match`` and ``try`` name it: relative to the folder given, or its name."""
    return path.name if path == folder else path.relative_to(folder).as_posix()


def _mounts(mounts: dict[str, str]) -> str:
    return ", ".join(f"{name} ({path})" for name, path in mounts.items()) or "none"


def cmd_graph(args: argparse.Namespace) -> int:
    from raddeploy_provider.flows.graph import (REVIEW_TASK, SENSOR_TASK, model_order, return_task_id, send_task_id,
                                                task_edges)

    flow = _load_one(Path(args.flow))
    if flow is None:
        return 2
    by_name = {model.name: model for model in flow.models}
    edges = task_edges(flow)
    grouping = flow.grouping
    print(f"flow {flow.dag_id} ({flow.name}): {flow.source}")
    print()
    print(SENSOR_TASK)
    print(f"  waits:   until every trigger ({len(flow.triggers)}) is satisfied and the study has been quiet "
          f"for {format_duration(grouping.quiet_period)}; after {format_duration(grouping.timeout)}: {grouping.on_timeout}")
    print(f"  out:     src (the matched instances; {_input_spec(flow)})")
    for name in model_order(flow):
        model = by_name[name]
        print(name)
        print(f"  image:   {model.image}")
        print(f"  gpu:     {model.gpu or 'none'}")
        print(f"  in:      {_mounts(model.inputs)}")
        print(f"  out:     {_mounts(model.outputs)}")
        if model.sent_outputs:
            targets = len(flow.destinations) + len(flow.return_to_sender)
            print(f"  sends:   {', '.join(model.sent_outputs)} to "
                  + (_plural(targets, "destination") if targets else "nowhere: the flow has no destinations"))
        if model.static_mounts:
            print(f"  static:  {_mounts(model.static_mounts)}")
        if model.timeout:
            print(f"  timeout: {format_duration(model.timeout)}")
        if model.network != "none":
            print(f"  network: {model.network}")
    senders = [model.name for model in flow.models if model.sent_outputs]
    if flow.review:
        review = flow.review
        print(REVIEW_TASK)
        print(f"  who:     {', '.join(review.reviewers) or 'any user who may edit the runs'} approves or rejects; "
              "nothing is sent before")
        if review.timeout:
            print(f"  timeout: {format_duration(review.timeout)}, then {review.on_timeout}")
    sends = [(send_task_id(i, dest), dest.describe()) for i, dest in enumerate(flow.destinations)]
    sends += [(return_task_id(port), f"the sender of the study, on port {port}") for port in flow.return_to_sender]
    for task_id, target in sends:
        print(task_id)
        print(f"  to:      {target}")
        print("  sends:   " + ("; ".join(f"{', '.join(by_name[n].sent_outputs)} of {n}" for n in senders)
                                or "nothing: no model has a dst* output"))
    print()
    print("edges (in run order):")
    up = max((len(edge.upstream) for edge in edges), default=0)
    down = max((len(edge.downstream) for edge in edges), default=0)
    for edge in edges:
        what = ", ".join(edge.mounts) if edge.mounts else "(order only)"
        print(f"  {edge.upstream:<{up}} -> {edge.downstream:<{down}}  {what}")
    return 0


def cmd_try(args: argparse.Namespace) -> int:
    from raddeploy import trial

    return trial.run(Path(args.flow), Path(args.dicom_dir), keep=Path(args.keep) if args.keep else None,
                     model=args.model)


def cmd_demo(args: argparse.Namespace) -> int:
    from raddeploy.demo import run_demo

    try:
        outcome = run_demo(host=args.host, port=args.port, ae_title=args.ae_title, ui_url=args.ui,
                           receive_port=args.receive_port, timeout=args.timeout,
                           keep=Path(args.keep).absolute() if args.keep else None,
                           say=lambda line: print(line, flush=True))
    except RuntimeError as exc:
        print(f"raddeploy demo: {exc}", file=sys.stderr)
        return 1
    for problem in outcome.problems:
        print(f"problem: {problem}", file=sys.stderr)
    if not outcome.passed:
        return 1
    print(f"""
The RTSTRUCT passed the checks ({outcome.received} results received in all).
See the run in the Airflow UI: {outcome.run_url}
  (Graph: fingerprint -> body_contour -> send; each task's log; the run note says what it did)""")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from raddeploy.embedded import EmbeddedStack, StackGaveUp

    stack = EmbeddedStack(home=Path(args.home).absolute(), flows_dir=Path(args.flows).absolute(),
                          api_port=args.api_port, dicom_port=args.port, ae_title=args.ae_title,
                          listener_output=sys.stdout.fileno())
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"starting Airflow (logs: {stack.logs_dir}/airflow.log) ...", flush=True)
    try:
        stack.start()  # stops what it started if a child does not come up
    except RuntimeError as exc:
        print(f"raddeploy run: {exc}", file=sys.stderr, flush=True)
        return 1
    except BaseException:  # e.g. the GPU pool call failed: no Airflow left behind
        stack.stop()
        raise
    password = stack.passwords()["admin"]
    reach = ("this host only; RADDEPLOY_LISTEN_HOST=0.0.0.0 accepts others (set RADDEPLOY_ALLOWED_NETWORKS too)"
             if stack.dicom_host in ("127.0.0.1", "::1", "localhost") else
             "other hosts may connect (README: Security)")
    print(f"""
raddeploy is running.
  Airflow UI:   {stack.api_url}   user admin, password {password}
  DICOM:        AE title {args.ae_title}, port {args.port} on {stack.dicom_host}   (try: TCP_NODELAY=1 echoscu -aec {args.ae_title} localhost {args.port})
                {reach}
  flows:        {stack.flows_dir}
  data:         {stack.data_dir}
Ctrl-C stops everything. A process that dies is restarted; one that keeps dying stops everything.
""", flush=True)
    print("\n".join(stack.gpu_summary()) + "\n", flush=True)
    try:
        stack.supervise(stop)
    except StackGaveUp as exc:
        print(f"raddeploy run stopped: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        if stop.is_set():
            print("stopping ...", flush=True)
        stack.stop()  # whatever happened: never leave half the stack running
    return 0


def cmd_runs_show(args: argparse.Namespace) -> int:
    from raddeploy_provider.store import manifest

    data_dir = load_settings().data
    found = data_dir.find_runs(args.run_id, args.dag)
    if not found:
        print(f"no run {args.run_id} under {data_dir.runs}" + (f" for flow {args.dag}" if args.dag else ""),
              file=sys.stderr)
        return 1
    for run in found:
        print(json.dumps({"dag_id": run.dag_id, "run_id": run.run_id, **manifest.assemble(run)},
                         indent=2, sort_keys=True))
    return 0


def _index():  # noqa: ANN202 - the deployment's study index (RADDEPLOY_INDEX_URL or the data dir's SQLite)
    from raddeploy_provider.store import StudyIndex

    settings = load_settings()
    return StudyIndex(settings.index_url or settings.data.index, durable=settings.fsync)


def _rest_states():  # noqa: ANN202 - a DAG run's state over Airflow's REST API (the listener's account)
    import urllib.parse

    from raddeploy_provider.airflow_client import AirflowClient, AirflowUnavailable

    settings = load_settings()
    client = AirflowClient(settings.airflow_url, settings.airflow_user, settings.airflow_password, timeout=10)
    quote = lambda text: urllib.parse.quote(text, safe="")  # noqa: E731

    def state(dag_id: str, run_id: str) -> str | None:
        try:
            status, payload = client.get(f"/api/v2/dags/{quote(dag_id)}/dagRuns/{quote(run_id)}")
        except AirflowUnavailable as exc:
            raise SystemExit(f"Airflow at {settings.airflow_url} cannot be reached ({exc}): run states are needed; "
                             "start Airflow or set RADDEPLOY_AIRFLOW_URL") from None
        if status == 404:
            return None
        if status != 200:
            raise SystemExit(f"Airflow answered HTTP {status} for run {run_id} of {dag_id}: check "
                             "RADDEPLOY_AIRFLOW_USER / RADDEPLOY_AIRFLOW_PASSWORD")
        return str(payload.get("state"))

    return state


def cmd_audit(args: argparse.Namespace) -> int:
    from raddeploy_provider.store import audit
    from raddeploy_provider.units import parse_duration

    try:
        since = audit.since(parse_duration(args.since))
    except ValueError:
        print(f"--since {args.since!r}: write a duration (30m, 12h, 7d)", file=sys.stderr)
        return 2
    for record in _index().audit_records(since=since, study_uid=args.study):
        print(json.dumps(record.as_json(), sort_keys=True) if args.json else record.line())
    return 0


def cmd_purge(args: argparse.Namespace) -> int:
    import time

    from raddeploy_provider.store import retention

    settings = load_settings()
    data, index = settings.data, _index()
    if not args.dry_run:
        retention.empty_trash(data)
    started = time.time()
    plan = retention.plan(retention.gather(index, data, _rest_states()), retention.Policy.from_settings(settings),
                          time.time(), retention.free_bytes(data.root), gathered_at=started)
    outcome = retention.purge(plan, index, data, actor="raddeploy purge", dry_run=args.dry_run)
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, **retention.summary(outcome, plan),
                          "deleted": [{"study_uid": d.verdict.study_uid, "kind": d.verdict.kind, "early": d.early,
                                       "bytes": d.verdict.size, "reason": d.verdict.reason} for d in outcome.deleted],
                          "kept": [{"study_uid": v.study_uid, "reason": v.reason} for v in plan.verdicts
                                   if v.study_uid not in {d.verdict.study_uid for d in outcome.deleted}]},
                         indent=2))
    else:
        for line in retention.describe(outcome, plan, args.dry_run):
            print(line)
        gone = retention.summary(outcome, plan)
        print(f"{'would delete' if args.dry_run else 'deleted'} {gone['deleted']} of {gone['studies']} studies "
              f"({gone['bytes'] / 1e6:.1f} MB)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from raddeploy_provider import status
    from raddeploy_provider.dicom.scu import Node, NodeUnreachable, echo

    settings = load_settings()
    index = _index()
    host = "127.0.0.1" if settings.listen_host in ("0.0.0.0", "::", "") else settings.listen_host
    seen = status.last_association(index)  # before our own C-ECHO, which the trail records too
    try:
        answer = echo(Node(host=host, port=settings.listen_port, ae_title=settings.ae_title,
                           calling_ae_title="RADDEPLOY_STATUS", timeout=5, connect_timeout=5))
        listener = (f"answers C-ECHO at {settings.ae_title}@{host}:{settings.listen_port}" if answer == 0 else
                    f"C-ECHO at {host}:{settings.listen_port} answered 0x{answer:04X}")
    except NodeUnreachable as exc:
        listener = f"not reached at {settings.ae_title}@{host}:{settings.listen_port}: {exc}"
    listener += "; " + seen
    report = status.gather(settings, index, _rest_states(), listener, limit=args.last)
    print(json.dumps(report.as_json(), indent=2) if args.json else report.text(), end="" if not args.json else "\n")
    return 0


class TargetError(ValueError):
    """A TARGET, option, path or connection that names no usable node (exit 2)."""


#: How the command line names the node's fields in its messages.
OPTION_LABELS = {"host": "the host", "port": "the port", "ae_title": "the AE title", "tls": "--tls",
                 "tls_ca_file": "--ca", "tls_cert_file": "--cert", "tls_key_file": "--key",
                 "tls_verify_hostname": "--no-verify-hostname", "calling_ae_title": "--calling-ae",
                 "timeout": "--timeout", "connect_timeout": "--connect-timeout",
                 "max_associations": "--associations"}
TARGET_FORM = "AE@HOST:PORT (e.g. PACS@pacs.hospital.local:104) or an Airflow connection id"

#: Exit codes of echo and send (their --help lists them).
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
ECHO_EXIT_CODES = """exit codes:
  0  the node answered the C-ECHO with success (0x0000)
  1  the node associated but answered another status
  2  a bad TARGET, option or connection (the message names the field and what to set)
  3  the node could not be reached: no association (the message says the cause and what to check)"""
SEND_EXIT_CODES = """exit codes:
  0  every instance was stored (accepted, or accepted with a warning status)
  1  some file was not accepted: refused by the node, not sent after a lost association, or not
     DICOM; each is listed (SOP Instance UID, status, reason)
  2  a bad TARGET, option, PATH or connection (the message says what to fix)
  3  the node could not be reached: no association, nothing sent (the message says why)"""


def parse_address(target: str) -> dict[str, object] | None:
    """``AE@HOST:PORT`` (``AE@[v6]:PORT``) as host, port and ae_title; None for a connection id."""
    if "@" not in target:
        if ":" in target or "/" in target:
            raise TargetError(f"target {target!r}: no AE title: write {TARGET_FORM}")
        return None
    ae, _, address = target.rpartition("@")
    if not ae.strip():
        raise TargetError(f"target {target!r}: the AE title before '@' is empty: write {TARGET_FORM}")
    if address.startswith("["):
        host, bracket, rest = address[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            raise TargetError(f"target {target!r}: write an IPv6 address in brackets, then the port: AE@[::1]:104")
        port = rest[1:]
    else:
        host, colon, port = address.rpartition(":")
        if not colon:
            raise TargetError(f"target {target!r}: no port: write {TARGET_FORM}")
        if ":" in host:
            raise TargetError(f"target {target!r}: write an IPv6 address in brackets: AE@[::1]:104")
    if not host:
        raise TargetError(f"target {target!r}: no host between '@' and ':': write {TARGET_FORM}")
    if not port.isdigit():
        raise TargetError(f"target {target!r}: the port {port!r} is not a number: write {TARGET_FORM}")
    return {"host": host, "port": int(port), "ae_title": ae}


def _node_options(args: argparse.Namespace) -> dict[str, object]:
    """The fields the options set (None: not given: the connection's value, or the default)."""
    return {"tls": args.tls, "tls_ca_file": args.ca, "tls_cert_file": args.cert, "tls_key_file": args.key,
            "tls_verify_hostname": args.verify_hostname, "calling_ae_title": args.calling_ae,
            "timeout": args.timeout, "connect_timeout": args.connect_timeout,
            "max_associations": getattr(args, "associations", None)}


def _connection_node(conn_id: str, options: dict[str, object]) -> Node:
    """The node of an Airflow connection (AIRFLOW_CONN_<ID> or the metadata DB), through DicomHook."""
    # Look in the metadata DB too, as `airflow connections get` does: outside a task, the SDK
    # reads only the environment and external secrets backends unless told it runs as a server.
    os.environ.setdefault("_AIRFLOW_PROCESS_CONTEXT", "server")
    if not logging.getLogger().isEnabledFor(logging.DEBUG):  # Airflow's start-up lines only with -v
        logging.getLogger("airflow").setLevel(logging.WARNING)
    from airflow.sdk.exceptions import AirflowNotFoundException

    from raddeploy_provider.hooks.dicom import DicomHook

    hook = DicomHook(dicom_conn_id=conn_id, **{k: v for k, v in options.items() if v is not None})
    try:
        return hook.node()
    except AirflowNotFoundException:
        env = f"AIRFLOW_CONN_{conn_id.upper()}"
        if os.environ.get(env):
            from airflow.sdk.definitions.connection import Connection

            value = os.environ[env]
            try:  # Airflow skips a connection it cannot parse as "not defined": say why
                if value.lstrip().startswith("{"):
                    Connection.from_json(value, conn_id=conn_id)
                else:
                    Connection.from_uri(value, conn_id=conn_id)
                why = "Airflow could not read it"
            except Exception as exc:
                why = str(exc)
            raise TargetError(f"connection {conn_id!r}: {env} is set but is not a connection ({why}): give JSON "
                              '{"conn_type": "dicom", "host": ..., "port": ..., "extra": {"ae_title": ...}} '
                              "or a URI dicom://HOST:PORT?ae_title=AE") from None
        raise TargetError(f"no connection {conn_id!r} in {env} or Airflow's metadata DB (AIRFLOW_HOME="
                          f"{os.environ.get('AIRFLOW_HOME', '~/airflow')}): create it (docs/connections.md), "
                          f"or give the node as {TARGET_FORM}") from None
    except ValueError as exc:
        raise TargetError(str(exc)) from None


def resolve_target(target: str, options: dict[str, object]) -> Node:
    """The node TARGET names, the options on top; TargetError saying what to fix."""
    from raddeploy_provider.hooks.dicom_node import build_node

    address = parse_address(target)
    if address is None:
        return _connection_node(target, options)
    try:
        return build_node({**options, **address}, f"target {target!r}", OPTION_LABELS)
    except ValueError as exc:
        raise TargetError(str(exc)) from None


def cmd_echo(args: argparse.Namespace) -> int:
    from raddeploy_provider.hooks.dicom_node import echo_outcome

    try:
        node = resolve_target(args.target, _node_options(args))
    except TargetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    outcome, message = echo_outcome(node)
    print(message if outcome == "ok" else f"error: {message}", file=sys.stdout if outcome == "ok" else sys.stderr)
    return {"ok": EXIT_OK, "refused": EXIT_REFUSED}.get(outcome, EXIT_UNREACHABLE)


def _files(paths: list[str]) -> list[Path]:
    """Every file named, and every file under each folder named (recursively), in order, once."""
    found: dict[Path, None] = {}
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found.update(dict.fromkeys(sorted(p for p in path.rglob("*") if p.is_file())))
        elif path.is_file():
            found[path] = None
        else:
            raise TargetError(f"{path}: no such file or folder")
    return list(found)


def cmd_send(args: argparse.Namespace) -> int:
    from raddeploy_provider.dicom.scu import send_files

    try:
        files = _files(args.paths)
        node = resolve_target(args.to, _node_options(args))
    except TargetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not files:
        print(f"error: no files under {', '.join(args.paths)}", file=sys.stderr)
        return EXIT_USAGE
    if not args.json:
        print(f"sending {_plural(len(files), 'file')} to {node} ...", flush=True)
    report = send_files(node, files)
    refused, warned = report.refused, report.warned
    if args.json:
        print(json.dumps(report.summary(), indent=2))
    else:
        print(f"{report.node}: {len(report.results) - len(refused)} accepted ({len(warned)} with a warning), "
              f"{len(refused)} not accepted")
        if report.unreachable:  # nothing was sent: list only the files that were not DICOM
            print(f"unreachable: {report.unreachable}")
            refused = [r for r in refused if r.reason != "not sent"]
        for title, results in (("not accepted", refused), ("accepted with a warning", warned)):
            if results:
                print(f"{title} ({len(results)}): SOP Instance UID, status, reason")
                for r in results:
                    status = "no status" if r.status is None else f"0x{r.status:04X}"
                    reason = r.reason.removeprefix(f"status {status}: ")
                    print(f"  {r.sop_instance_uid or r.path}  {status}  {reason}".rstrip())
    if report.ok:
        return EXIT_OK
    if report.unreachable and not any(r.status is not None for r in refused):
        return EXIT_UNREACHABLE
    return EXIT_REFUSED


def _add_node_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls", action="store_const", const=True, default=None,
                   help="associate over TLS (default: off, or the connection's tls)")
    p.add_argument("--ca", metavar="FILE", help="PEM bundle of the CAs that sign the node's certificate "
                                                "(default: the system's CAs); needs --tls")
    p.add_argument("--cert", metavar="FILE", help="our client certificate (PEM); needs --tls")
    p.add_argument("--key", metavar="FILE", help="the client certificate's private key (PEM); needs --cert")
    p.add_argument("--no-verify-hostname", dest="verify_hostname", action="store_const", const=False,
                   default=None, help="do not check that the node's certificate names its host")
    p.add_argument("--calling-ae", metavar="AE", help="our AE title (default: RADDEPLOY, or the connection's)")
    p.add_argument("--timeout", type=float, metavar="S",
                   help="seconds each wait for the node may take once connected (default: 30, or the "
                        "connection's)")
    p.add_argument("--connect-timeout", type=float, metavar="S",
                   help="seconds for the TCP connection, TLS handshake and association answer (default: 10, "
                        "or the connection's)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="raddeploy", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("listen", help="run the DICOM listener (RADDEPLOY_* settings)")
    p.set_defaults(func=cmd_listen)

    p = sub.add_parser("validate", help="check flow files; exit 1 if any is invalid")
    p.add_argument("paths", nargs="*", help="flow files or folders (default: RADDEPLOY_FLOWS)")
    p.add_argument("--json", action="store_true", help="print one JSON document: flows, errors, warnings")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("match", help="which triggers each DICOM file satisfies, whether the flow would run, "
                                     "and what its models would get; exit 0 if it would run (for some study), "
                                     "1 if not, 2 if the flow does not load")
    p.add_argument("flow", help="a flow file")
    p.add_argument("dicom_dir", help="a folder of DICOM files (searched recursively) or one file")
    p.set_defaults(func=cmd_match)

    p = sub.add_parser("graph", help="the task graph of a flow, as its DAG will have it; exit 2 if it does not load")
    p.add_argument("flow", help="a flow file")
    p.set_defaults(func=cmd_graph)

    from raddeploy import trial

    p = sub.add_parser("try", help=trial.HELP, description=trial.DESCRIPTION, epilog=trial.EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("flow", help="a flow file")
    p.add_argument("dicom_dir", help="a folder of one study's DICOM files (searched recursively) or one file")
    p.add_argument("--keep", metavar="DIR", help="a new or empty folder to hold the trial's data dir and run "
                                                "folder afterwards (default: a temporary one, removed)")
    p.add_argument("--model", metavar="NAME", help="run only this model and the models it reads from")
    p.set_defaults(func=cmd_try)

    p = sub.add_parser("runs", help="what runs used and produced (their manifests)")
    runs = p.add_subparsers(dest="runs_command", required=True)
    p = runs.add_parser("show", help="print the manifest of a run (RADDEPLOY_DATA)")
    p.add_argument("run_id", help="the run id, e.g. <StudyInstanceUID>.1")
    p.add_argument("--dag", help="the flow's DAG id, when several flows ran on the study")
    p.set_defaults(func=cmd_runs_show)

    p = sub.add_parser("status", help="the last studies, their runs and times, the outbox, disk, GPUs, the listener")
    p.add_argument("--last", type=int, default=20, metavar="N", help="how many studies (default: 20)")
    p.add_argument("--json", action="store_true", help="one JSON document")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("audit", help="the audit trail: associations, runs, models, reviews, sends, deletions")
    p.add_argument("--since", default="1d", help="how far back (default: 1d; 30m, 12h, 7d)")
    p.add_argument("--study", metavar="UID", help="only this Study Instance UID")
    p.add_argument("--json", action="store_true", help="JSON lines, as the daily export in <data>/audit/")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("purge", help="apply retention now (RADDEPLOY_RETAIN_*, RADDEPLOY_DISK_LOW_WATER), as the "
                       "raddeploy_retention DAG does hourly")
    p.add_argument("--dry-run", action="store_true", help="delete nothing: list what would go and what is kept, why")
    p.add_argument("--json", action="store_true", help="one JSON document")
    p.set_defaults(func=cmd_purge)

    target_help = (f"the node: {TARGET_FORM} (from AIRFLOW_CONN_<ID> or Airflow's metadata DB; "
                   "Airflow is imported only then); options given override the connection's fields")
    p = sub.add_parser("echo", help="C-ECHO a DICOM node, as the connection's Test button does",
                       description="C-ECHO a DICOM node and print its status.", epilog=ECHO_EXIT_CODES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("target", metavar="TARGET", help=target_help)
    _add_node_options(p)
    p.set_defaults(func=cmd_echo)

    p = sub.add_parser("send", help="send DICOM files to a node, as a flow's destination does",
                       description="Send DICOM files (folders: every file under them) to a node; print the "
                                   "counts and every refused instance.", epilog=SEND_EXIT_CODES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", metavar="PATH", help="DICOM files or folders (searched recursively)")
    p.add_argument("--to", required=True, metavar="TARGET", help=target_help)
    _add_node_options(p)
    p.add_argument("--associations", type=int, metavar="N",
                   help="associations to open at once (default: 1 or the connection's max_associations)")
    p.add_argument("--json", action="store_true", help="print the send report as one JSON document")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("run", help="the embedded default: Airflow standalone + listener, in the foreground")
    p.add_argument("--home", default=".raddeploy", help="state folder (default: .raddeploy)")
    p.add_argument("--flows", default="flows", help="flows folder (default: flows)")
    p.add_argument("--port", type=int, default=11112, help="DICOM port (default: 11112)")
    p.add_argument("--ae-title", default="RADDEPLOY")
    p.add_argument("--api-port", type=int, default=8080, help="Airflow API/UI port (default: 8080)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="against a running `raddeploy run`: push a synthetic CT phantom, receive the "
                       "body-contour RTSTRUCT, check it, say where to look in the UI")
    p.add_argument("--host", default="127.0.0.1", help="the listener's host (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=11112, help="its DICOM port (default: 11112, as `raddeploy run`)")
    p.add_argument("--ae-title", default="RADDEPLOY", help="its AE title (default: RADDEPLOY)")
    p.add_argument("--ui", default="http://127.0.0.1:8080", help="the Airflow UI (default: http://127.0.0.1:8080)")
    p.add_argument("--receive-port", type=int, default=11113, help="where the results arrive: the body_contour "
                   "flow's destination (default: 11113)")
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for the RTSTRUCT (default: 300)")
    p.add_argument("--keep", metavar="DIR", help="keep the phantom and what arrived in DIR")
    p.set_defaults(func=cmd_demo)

    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        return args.func(args)
    except BrokenPipeError:  # `raddeploy match ... | head`: the reader left, that is all
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
