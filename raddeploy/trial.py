"""``raddeploy try``: a flow's models on local DICOM files, through the operators a DAG runs.

No scheduler, no metadata database, no listener: the files' headers are read and matched as
``raddeploy match`` does, the chosen instances are placed in a data dir of their own (a
temporary one, or ``--keep DIR``) exactly as the listener stores them and the fingerprint
sensor snapshots them, and each model's :class:`~raddeploy_provider.operators.model.ModelOperator`
(built by :func:`raddeploy_provider.dag_factory.model_task`, as its DAG builds it) runs on the
real Docker engine through ``execute(context)``, inside the same execution-timeout wrapper the
task runner uses. Nothing is sent: destinations are never contacted. What is printed names
files, UIDs, modalities and SOP classes, never a patient's name or ID.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from raddeploy.cli import _input_spec, _load_one, _plural, read_dicom_folder, shown_name
from raddeploy_provider.config import load_settings
from raddeploy_provider.units import format_duration

if TYPE_CHECKING:
    from raddeploy_provider.flows import Flow
    from raddeploy_provider.store import InstanceHeader, RunDir

#: Exit codes: every model ran and succeeded; the flow would not run or a model failed; a usage error.
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
#: Run generation of a trial run: its run id is ``<StudyInstanceUID>.1``, as a study's first run.
GENERATION = 1
#: At most this many files' reasons are listed per unmet trigger (``raddeploy match`` lists all).
SHOWN_REASONS = 5

HELP = "run a flow's models on local DICOM files (real Docker, no Airflow scheduler, nothing sent)"
DESCRIPTION = """\
Run a flow's models on the DICOM files of one study, through the same operator code a DAG task
runs (ModelOperator, the real Docker engine), without Airflow's scheduler or database, and print
each step: image, exit code, GPUs, duration, outputs (DICOM outputs: one line per series), and
the failure when a model fails (later models are not run). The chosen files are copied into a
temporary data dir laid out as the real one (RADDEPLOY_DATA points there while the models run);
the originals are never changed. Destinations are not contacted: nothing is sent. Static assets
come from RADDEPLOY_STATIC (default: the static/ folder of your RADDEPLOY_DATA).

A model with `gpu:` on a host without GPUs fails, as its task would; with
RADDEPLOY_GPU_FALLBACK=cpu it runs without a device and the container gets
RADDEPLOY_GPU_FALLBACK=1. `raddeploy -v try ...` also shows the operator's log and the
container's output as they happen."""
EPILOG = """exit codes:
  0  every model ran and succeeded
  1  the flow would not run on these files (the reasons are printed), or a model failed
  2  the flow does not load, or a bad argument (DICOM_DIR, --keep DIR, --model NAME)"""


class TrialError(Exception):
    """A bad argument or a study that cannot be tried as it is (exit 2); the message says what to do."""


@dataclass
class Step:
    """What one model did: its manifest record, how long ``execute`` took and, if it failed, why."""

    name: str
    record: dict[str, Any]
    seconds: float
    failure: str | None = None
    timed_out: bool = False


def run(flow_path: Path, dicom_dir: Path, keep: Path | None = None, model: str | None = None) -> int:
    """The whole of ``raddeploy try``: prints as it goes, returns the exit code."""
    flow = _load_one(flow_path)
    if flow is None:
        return EXIT_USAGE
    try:
        wanted = _models_to_run(flow, model)
        if not dicom_dir.exists():
            raise TrialError(f"{dicom_dir}: no such file or folder")
        keep = _check_keep(keep)
    except TrialError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    print(f"flow {flow.dag_id} ({flow.name}): {flow.source}")
    for i, trigger in enumerate(flow.triggers, 1):
        print(f"  trigger {i}: {trigger.describe()}")
    try:
        study_uid, chosen = _choose(flow, dicom_dir)
    except TrialError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if study_uid is None:
        print("\nthe flow would not run on these files: no study satisfies every trigger "
              "(`raddeploy match` lists every file's reasons)")
        return EXIT_FAILED

    root = keep or Path(tempfile.mkdtemp(prefix="raddeploy-try-"))
    try:
        return _run_models(flow, wanted, study_uid, chosen, root, kept=keep is not None)
    finally:
        if keep is None:
            _remove(root)


# -- arguments ---------------------------------------------------------------------------------

def _models_to_run(flow: Flow, name: str | None) -> list[str]:
    """The flow's models in run order; with ``name``, that model and those it reads from."""
    from raddeploy_provider.flows.graph import model_order, upstream

    order = model_order(flow)
    if name is None:
        return order
    if name not in order:
        raise TrialError(f"--model {name}: the flow has no model of that name; its models: {', '.join(order)}")
    deps, needed, todo = upstream(flow), set(), [name]
    while todo:
        current = todo.pop()
        if current not in needed:
            needed.add(current)
            todo.extend(deps[current])
    return [m for m in order if m in needed]


def _check_keep(keep: Path | None) -> Path | None:
    """``--keep DIR``: a new or empty folder (never a real data dir), made here; absolute."""
    if keep is None:
        return None
    keep = keep.absolute()
    if keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
        raise TrialError(f"--keep {keep}: exists and is not an empty folder; give a new or empty folder "
                         "(it becomes the trial's data dir, so it is never a real one)")
    keep.mkdir(parents=True, exist_ok=True)
    return keep


# -- the input ---------------------------------------------------------------------------------

def _choose(flow: Flow, folder: Path) -> tuple[str | None, list[tuple[Path, InstanceHeader]]]:
    """The study the flow would run on and the files its ``src`` gets (as the sensor picks them),
    printing which triggers each study meets; ``(None, [])`` when no study would run."""
    from raddeploy_provider.flows import explain
    from raddeploy_provider.flows.matching import select_inputs, trigger_matches, unmet_triggers

    studies, unreadable = read_dicom_folder(folder)
    shown = functools.partial(shown_name, folder)
    if unreadable:
        print(f"\nunreadable: {_plural(len(unreadable), 'file')} (not used)")
        for path, reason in unreadable[:SHOWN_REASONS]:
            print(f"  {shown(path)}: {reason}")
        if len(unreadable) > SHOWN_REASONS:
            print(f"  ... and {len(unreadable) - SHOWN_REASONS} more")
    if not studies:
        print(f"\nno readable DICOM file under {folder}")
        return None, []

    runnable: dict[str, list[tuple[Path, InstanceHeader]]] = {}
    for uid, items in studies.items():
        unmet = unmet_triggers(flow, [header.tags for _, header in items])
        print(f"\nstudy {uid}: {_plural(len(items), 'file')}, would run: {'no' if unmet else 'yes'}")
        for i, trigger in enumerate(flow.triggers):
            met = sum(trigger_matches(trigger, header.tags) for _, header in items)
            if met:
                print(f"  trigger {i + 1}: satisfied by {_plural(met, 'file')}")
                continue
            print(f"  trigger {i + 1}: not satisfied by any file")
            for path, header in items[:SHOWN_REASONS]:
                print(f"    {shown(path)}: {'; '.join(explain(trigger, header.tags))}")
            if len(items) > SHOWN_REASONS:
                print(f"    ... and {len(items) - SHOWN_REASONS} more files")
        if not unmet:
            chosen = [items[i] for i in select_inputs(flow, [(h.series_uid, h.tags) for _, h in items])]
            runnable[uid] = chosen
            series = {header.series_uid for _, header in chosen}
            print(f"  src: {_plural(len(chosen), 'file')} of {_plural(len(series), 'series')} ({_input_spec(flow)})")
    if len(runnable) > 1:
        raise TrialError(f"{len(runnable)} studies under {folder} would run ({', '.join(runnable)}): "
                         "`raddeploy try` runs one; give a folder that holds one study")
    if not runnable:
        return None, []
    uid, chosen = next(iter(runnable.items()))
    return uid, chosen


def _place_input(flow: Flow, data: Any, run: RunDir, chosen: list[tuple[Path, InstanceHeader]]) -> int:
    """Copy the chosen files into ``studies/`` as the listener stores them (0640, the data dir's
    group), then snapshot them into the run's ``input/`` as the fingerprint sensor does
    (:func:`raddeploy_provider.store.snapshot`: names, layout, ``input.transfer_syntax``).
    The originals are only read. Returns how many instances the input holds."""
    from raddeploy_provider.store import StoredInstance, snapshot

    gid = os.stat(data.root).st_gid
    instances: dict[str, StoredInstance] = {}  # SOP Instance UID -> instance: a later copy replaces it
    duplicates = 0
    for path, header in chosen:
        target = data.instance_path(header.study_uid, header.series_uid, header.sop_uid)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        os.chmod(target, 0o640)
        with contextlib.suppress(PermissionError):
            if os.stat(target).st_gid != gid:
                os.chown(target, -1, gid)
        duplicates += header.sop_uid in instances
        instances[header.sop_uid] = StoredInstance(
            sop_uid=header.sop_uid, study_uid=header.study_uid, series_uid=header.series_uid,
            sop_class_uid=header.sop_class_uid, transfer_syntax=header.transfer_syntax,
            path=str(target.relative_to(data.root)), size=target.stat().st_size, sha256="", received_at=time.time(),
            tags=header.tags)
    if duplicates:
        print(f"  note: {_plural(duplicates, 'file')} repeat a SOP Instance UID of another; the last in path order "
              "is used, as the listener keeps the newest version")
    snapshot(list(instances.values()), data.root, run.input, flow.input.layout,
             uncompressed=flow.input.transfer_syntax == "uncompressed")
    return len(instances)


# -- the models --------------------------------------------------------------------------------

@contextlib.contextmanager
def _settings_for(data_root: Path) -> Iterator[None]:
    """RADDEPLOY_DATA (and, unless set, RADDEPLOY_STATIC: the real static assets) for the trial's
    data dir while the models run; the environment exactly as it was afterwards."""
    static = load_settings().data.static  # the user's assets, read before RADDEPLOY_DATA moves
    saved = {name: os.environ.get(name) for name in ("RADDEPLOY_DATA", "RADDEPLOY_STATIC")}
    os.environ["RADDEPLOY_DATA"] = str(data_root)
    os.environ["RADDEPLOY_STATIC"] = str(static)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _task_log() -> Iterator[None]:
    """The operator's log (structlog, as in a task) on stderr, one indented line per event:
    warnings (GPU fallback, output problems) always, its INFO lines and the container's output
    only with ``-v``. Structlog's configuration is restored afterwards."""
    import structlog

    verbose = logging.getLogger().isEnabledFor(logging.DEBUG)
    airflow_log = logging.getLogger("airflow")
    airflow_level = airflow_log.level
    if not verbose:  # Airflow's start-up lines only with -v, as for a connection id
        airflow_log.setLevel(logging.WARNING)
    import raddeploy_provider.dag_factory  # noqa: F401  Airflow configures structlog as it is imported: first

    saved = structlog.get_config()

    def render(logger: Any, method: str, event: dict[str, Any]) -> str:
        text = str(event.pop("event", ""))
        level = event.pop("level", method)
        extra = " ".join(f"{k}={v}" for k, v in event.items() if k not in ("logger_name", "exc_info"))
        return f"  | {level}: {text}" + (f" ({extra})" if extra else "")

    structlog.configure(processors=[structlog.processors.add_log_level, render],
                        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO if verbose
                                                                            else logging.WARNING),
                        logger_factory=structlog.PrintLoggerFactory(sys.stderr), cache_logger_on_first_use=False)
    try:
        yield
    finally:
        structlog.configure(**saved)
        airflow_log.setLevel(airflow_level)


def _run_models(flow: Flow, wanted: list[str], study_uid: str, chosen: list[tuple[Path, InstanceHeader]],
                root: Path, kept: bool) -> int:
    from raddeploy_provider.store import DataDir, manifest

    data = DataDir(root)
    data.create()
    run_id = f"{study_uid}.{GENERATION}"
    run = data.run(flow.dag_id, run_id)
    count = _place_input(flow, data, run, chosen)
    manifest.record(run, manifest.RUN_PART, {
        "flow": {"dag_id": flow.dag_id, "name": flow.name, "version": flow.version, "file": str(flow.source),
                 "sha256": flow.file_hash},
        "study_uid": study_uid,
        "input": {"series": sorted({h.series_uid for _, h in chosen}),
                  "sop_instance_uids": sorted({h.sop_uid for _, h in chosen})},
        "sender": None, "sender_refused": "raddeploy try: files from a folder, nothing is sent",
    })
    print(f"\nrun {run_id}: input/ holds {_plural(count, 'instance')}; "
          f"{_plural(len(wanted), 'model')} to run: {', '.join(wanted)}")

    by_name = {m.name: m for m in flow.models}
    failed = False
    with _settings_for(root), _task_log():
        for n, name in enumerate(wanted, 1):
            print(f"\n{name} ({n}/{len(wanted)})", flush=True)
            step = _execute(flow, by_name[name], run, study_uid)
            _report(step, by_name[name], run)
            if step.failure is not None:
                failed = True
                rest = wanted[n:]
                if rest:
                    print(f"\nnot run: {', '.join(rest)} (after the failure of {name})")
                break
        if not failed:
            _guard(flow, [by_name[name] for name in wanted], run)

    print()
    targets = [d.describe() for d in flow.destinations] + [f"the sender, port {p}" for p in flow.return_to_sender]
    print("nothing was sent: `raddeploy try` does not contact destinations"
          + (f" (this flow's: {'; '.join(targets)})" if targets else " (this flow has none)"))
    if kept:
        print(f"run folder: {run.root}")
        print(f"its manifest: RADDEPLOY_DATA={root} raddeploy runs show {run.run_id}")
    else:
        print("the run folder was temporary and is removed (--keep DIR keeps it)")
    return EXIT_FAILED if failed else EXIT_OK


def _execute(flow: Flow, model: Any, run: RunDir, study_uid: str) -> Step:
    """One model's operator, built as its DAG builds it, through ``execute(context)`` as the task
    runner calls it (the executor safeguard set, the execution timeout, ``on_kill`` on a timeout)."""
    from airflow.sdk.bases.operator import ExecutorSafeguard
    from airflow.sdk.exceptions import AirflowTaskTimeout
    from airflow.sdk.execution_time.timeout import timeout

    from raddeploy_provider.dag_factory import model_task
    from raddeploy_provider.store import manifest

    operator = model_task(flow, model, load_settings())
    context = {
        "dag": SimpleNamespace(dag_id=flow.dag_id),
        "run_id": run.run_id,
        "dag_run": SimpleNamespace(dag_id=flow.dag_id, run_id=run.run_id,
                                   conf={"study_uid": study_uid, "generation": GENERATION}),
        "task": operator,
        "ti": SimpleNamespace(dag_id=flow.dag_id, run_id=run.run_id, task_id=operator.task_id, try_number=1,
                              map_index=-1),
    }
    failure, timed_out = None, False
    started = time.monotonic()
    ctx = contextvars.copy_context()
    ctx.run(ExecutorSafeguard.tracker.set, operator)
    try:
        if operator.execution_timeout:
            try:
                with timeout(operator.execution_timeout.total_seconds()):
                    ctx.run(operator.execute, context=context)
            except AirflowTaskTimeout:
                operator.on_kill()
                raise
        else:
            ctx.run(operator.execute, context=context)
    except AirflowTaskTimeout:
        timed_out = True
        failure = (f"timed out after {format_duration(model.timeout)} (`timeout:` in the flow): the container was "
                   "killed")
    except Exception as exc:  # the operator's words: ModelFailed, image missing, wrote nothing, GPUs...
        failure = str(exc)
    except BaseException:  # Ctrl-C: no container left behind
        operator.on_kill()
        raise
    seconds = time.monotonic() - started
    record = manifest.assemble(run).get("tasks", {}).get(operator.task_id, {})
    return Step(model.name, record, seconds, failure, timed_out)


def _report(step: Step, model: Any, run: RunDir) -> None:
    from raddeploy_provider.store import outputs

    record = step.record
    image_id = str(record.get("image_id", "")).removeprefix("sha256:")[:12]
    print(f"  image:     {model.image}" + (f" (id {image_id})" if image_id else ""))
    exit_code = record.get("exit_code")
    none = "none (killed at the timeout)" if step.timed_out else "none (the container did not run)"
    print(f"  exit code: {none if exit_code is None else exit_code}"
          + (" (killed: out of memory)" if record.get("oom_killed") else ""))
    gpus = ", ".join(record.get("gpus") or []) or "none"
    if record.get("gpu_fallback") == "cpu":
        gpus += f" (asks for {model.gpu}; ran on the CPU: RADDEPLOY_GPU_FALLBACK=cpu)"
    elif model.gpu and not record.get("gpus"):
        gpus += f" (asks for {model.gpu})"
    print(f"  gpus:      {gpus}")
    print(f"  duration:  {step.seconds:.1f}s (container start included)")
    if step.failure is None or record.get("outputs"):
        for name in model.outputs:
            files, problems = outputs.walk(run.mount(name), run.root)
            sent = " (sent in a real run)" if name in model.sent_outputs else ""
            print(f"  output {name}: {_plural(len(files), 'file')}{sent}")
            for line in _series_lines(files):
                print(f"    {line}")
            for problem in problems:
                print(f"    problem: {problem}")
    if step.failure is not None:
        print("  FAILED:")
        for line in step.failure.splitlines():
            print(f"    {line}")
        if model.retries:
            print(f"    (a real run tries it {_plural(model.retries, 'more time')}: `retries: {model.retries}`)")


def _series_lines(files: list[Path]) -> list[str]:
    """One line per DICOM series among ``files`` (modality, SOP class, count, series UID), and
    a count of the files that are not DICOM; no name or ID of a patient."""
    from pydicom.uid import UID

    from raddeploy_provider.store import read_header

    series: dict[str, list[Any]] = {}  # series UID -> [modality, SOP class UID, count]
    other = 0
    for path in files:
        try:
            header = read_header(path)
        except Exception:
            other += 1
            continue
        entry = series.setdefault(header.series_uid, [header.modality or "no Modality", header.sop_class_uid, 0])
        entry[2] += 1
    lines = []
    for uid, (modality, sop_class, count) in series.items():
        name = UID(sop_class).name
        lines.append(f"{modality}, {name if name != sop_class else 'SOP class ' + sop_class}: "
                     f"{_plural(count, 'instance')} (series {uid})")
    if other:
        lines.append(f"{_plural(other, 'file')} not DICOM Part 10")
    return lines


def _guard(flow: Flow, models: list[Any], run: RunDir) -> None:
    """What the send tasks' output guard would say of the sent outputs (nothing is sent here)."""
    from raddeploy_provider.store import outputs

    sources = [name for model in models for name in model.sent_outputs]
    if not sources:
        return
    print()
    try:
        identity = outputs.input_identity(run.input, patient=not flow.new_patient, study=not flow.new_study)
    except (ValueError, OSError) as exc:
        print(f"output guard: a send task would send nothing: {exc}")
        return
    check = outputs.check_outputs([run.mount(name) for name in sources], run.root, identity)
    if check.ok:
        print(f"output guard: the {_plural(len(check.outputs), 'result')} of {', '.join(sources)} would be sent")
    else:
        print(f"output guard: {check.explain()}")


def _remove(root: Path) -> None:
    def failed(function: Any, path: str, exc: Any) -> None:
        print(f"warning: could not remove {path} ({exc}); remove {root} by hand", file=sys.stderr)

    if sys.version_info >= (3, 12):
        shutil.rmtree(root, onexc=failed)
    else:
        shutil.rmtree(root, onerror=lambda f, p, info: failed(f, p, info[1]))
