"""The ``raddeploy`` command. Airflow is imported lazily: only ``run`` needs it."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from raddeploy_provider.config import configure_logging, load_settings
from raddeploy_provider.units import format_duration

if TYPE_CHECKING:
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
            "flows": [{"file": str(flow.source), "dag_id": flow.dag_id, "name": flow.name} for flow in flows],
            "errors": [_problem(error) for error in errors],
            "warnings": [_problem(warning) for warning in warnings],
        }, indent=2))
    else:
        for result in results:
            for flow in result.flows:
                print(f"ok: {flow.source}: {flow.dag_id} ({_plural(len(flow.triggers), 'trigger')}, "
                      f"{_plural(len(flow.models), 'model')}, {_plural(len(flow.destinations), 'destination')})")
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
    from raddeploy_provider.store import read_header
    from raddeploy_provider.store.snapshot import input_path

    flow = _load_one(Path(args.flow))
    if flow is None:
        return 2
    folder = Path(args.dicom_dir)
    if not folder.exists():
        print(f"error: {folder}: no such file or folder", file=sys.stderr)
        return 2
    files = [folder] if folder.is_file() else sorted(p for p in folder.rglob("*") if p.is_file())

    print(f"flow {flow.dag_id} ({flow.name}): {flow.source}")
    for i, trigger in enumerate(flow.triggers, 1):
        print(f"  trigger {i}: {trigger.describe()}")
    studies: dict[str, list[tuple[str, InstanceHeader]]] = {}  # study UID -> (shown path, header), file order
    unreadable: list[tuple[str, str]] = []
    for path in files:
        shown = path.name if path == folder else path.relative_to(folder).as_posix()
        try:
            header = read_header(path)
        except Exception as exc:  # any file may lie in the folder; say why, never crash
            unreadable.append((shown, _unreadable(exc)))
            continue
        studies.setdefault(header.study_uid, []).append((shown, header))
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
        for shown, reason in unreadable:
            print(f"  {shown}: {reason}")
    return 0 if runs else 1


def _mounts(mounts: dict[str, str]) -> str:
    return ", ".join(f"{name} ({path})" for name, path in mounts.items()) or "none"


def cmd_graph(args: argparse.Namespace) -> int:
    from raddeploy_provider.flows.graph import SENSOR_TASK, model_order, return_task_id, send_task_id, task_edges

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


def cmd_run(args: argparse.Namespace) -> int:
    from raddeploy.embedded import EmbeddedStack

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

    p = sub.add_parser("runs", help="what runs used and produced (their manifests)")
    runs = p.add_subparsers(dest="runs_command", required=True)
    p = runs.add_parser("show", help="print the manifest of a run (RADDEPLOY_DATA)")
    p.add_argument("run_id", help="the run id, e.g. <StudyInstanceUID>.1")
    p.add_argument("--dag", help="the flow's DAG id, when several flows ran on the study")
    p.set_defaults(func=cmd_runs_show)

    p = sub.add_parser("run", help="the embedded default: Airflow standalone + listener, in the foreground")
    p.add_argument("--home", default=".raddeploy", help="state folder (default: .raddeploy)")
    p.add_argument("--flows", default="flows", help="flows folder (default: flows)")
    p.add_argument("--port", type=int, default=11112, help="DICOM port (default: 11112)")
    p.add_argument("--ae-title", default="RADDEPLOY")
    p.add_argument("--api-port", type=int, default=8080, help="Airflow API/UI port (default: 8080)")
    p.set_defaults(func=cmd_run)

    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    try:
        return args.func(args)
    except BrokenPipeError:  # `raddeploy match ... | head`: the reader left, that is all
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
