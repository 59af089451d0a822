"""Load flow files (native or RadDeploy spelling) into :class:`~.model.Flow` objects.

Every problem becomes a :class:`FlowError` naming the file, the line and the field, so a
medical physicist can fix the file without reading our code. A broken file never stops the
others from loading: :func:`load_flows` returns the flows and the errors side by side.

The reading is split by job: :mod:`.reader` reads the YAML nodes against :mod:`.schema`,
:mod:`.convert` turns each value into its Python form and :mod:`.raddeploy` turns
RadDeploy's spelling into the native fields. Here the top level is assembled into a
:class:`Flow` and its model graph checked.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from raddeploy_provider.units import slug

from . import raddeploy
from .errors import FlowError, FlowWarning
from .graph import GraphError, model_order, unused_outputs
from .model import SEARCH, Flow, Grouping, NotifySpec, Review
from .reader import Reader


@dataclass
class LoadResult:
    """What a flows folder holds: the usable flows and the errors of the others."""

    flows: list[Flow] = field(default_factory=list)
    errors: list[FlowError] = field(default_factory=list)
    warnings: list[FlowWarning] = field(default_factory=list)


def load_flows(folder: Path) -> LoadResult:
    """Load every ``*.yaml``/``*.yml`` under ``folder``; duplicate DAG ids are errors."""
    result = LoadResult()
    seen: dict[str, Path] = {}
    for path in flow_files(folder):
        try:
            flow = load_flow(path)
        except FlowError as exc:
            result.errors.append(exc)
            continue
        if flow.dag_id in seen:
            result.errors.append(
                FlowError(path, _dag_id_line(path), "id", f"DAG id {flow.dag_id!r} is already used by "
                          f"{seen[flow.dag_id]}", "give one of the flows another `id`")
            )
            continue
        seen[flow.dag_id] = path
        result.flows.append(flow)
        result.warnings.extend(flow.warnings)
    return result


def _dag_id_line(path: Path) -> int | None:
    """The line that gives a valid flow file its DAG id: ``id:``, or the ``name:`` it comes from."""
    try:  # read again: the file may have changed since it loaded, so expect anything
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    keys = {str(k.value): k for k, _ in root.value} if isinstance(root, yaml.MappingNode) else {}
    node = keys.get("id") or keys.get("name")
    return node.start_mark.line + 1 if node is not None else None


def flow_files(folder: Path) -> list[Path]:
    """Flow files under ``folder``, recursively, in a stable order."""
    if folder.is_file():
        return [folder]
    return sorted(p for p in folder.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def load_flow(path: Path) -> Flow:
    """Load one flow file or raise the first :class:`FlowError` it has."""
    raw = path.read_bytes()
    try:
        node = yaml.compose(raw.decode("utf-8"), Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise FlowError(path, line, "", f"not valid YAML: {getattr(exc, 'problem', exc)}",
                        "check indentation and quoting around that line") from None
    except UnicodeDecodeError:
        raise FlowError(path, None, "", "not UTF-8 text", "save the file as UTF-8") from None
    reader = Reader(path, node)
    flow = _flow(reader, hashlib.sha256(raw).hexdigest())
    _check_graph(reader, flow)
    return replace(flow, warnings=tuple(reader.warnings))


def _flow(reader: Reader, file_hash: str) -> Flow:
    """The top level: its sections, the DAG id (``id``, or made from ``name``), and a check that
    results sent somewhere come from a ``dst`` output."""
    if reader.root is None:
        raise reader.error(None, "", "the file is empty", "a flow needs at least triggers and models")
    values = reader.section(reader.root, "", "flow")
    name = values.get("name", reader.path.stem)
    ports = raddeploy.return_ports(values)
    input_spec = raddeploy.input_spec(reader, values)
    if (values.get("destinations") or ports) and not any(m.sent_outputs for m in values["models"]):
        fieldname = "destinations" if values.get("destinations") else "return_to_sender"
        node = reader.node_of("destinations") or reader.node_of(fieldname) or reader.root
        raise reader.error(node, fieldname, "results go somewhere, but no model writes a `dst` output",
                           "name the output to send `dst` (or `dst_<something>`)")
    new_patient = values.get("new_patient") == "allowed"
    new_study = new_patient or values.get("new_study") == "allowed"
    for key, allowed, what in (("new_patient", new_patient, "another Patient ID than the input's"),
                               ("new_study", values.get("new_study") == "allowed",
                                "another Study Instance UID than the input's")):
        if allowed:
            reader.warn(reader.node_of(key), key, f"results may carry {what}: the output guard does not "
                        "check it", "only for a flow meant to change identities, such as an anonymising export")
    return Flow(
        review=_review(reader, values),
        deadline=values.get("deadline"),
        notify=values.get("notify", NotifySpec()),
        name=name,
        dag_id=values.get("id", slug(name)),
        source=reader.path,
        version=values.get("version", ""),
        description=values.get("description", ""),
        priority=values.get("priority", 0),
        tags=values.get("tags", ()),
        triggers=values["triggers"],
        models=values["models"],
        destinations=values.get("destinations", ()),
        grouping=values.get("grouping", Grouping()),
        input=input_spec,
        return_to_sender=ports,
        new_study=new_study,
        new_patient=new_patient,
        provenance=values.get("provenance", True),
        extra=values.get("extra", {}),
        file_hash=file_hash,
        spelling="raddeploy" if reader.spelling == SEARCH else "native",
    )


def _review(reader: Reader, values: dict) -> Review | None:
    """``review: required`` and its settings; those settings without it are an error (they would do nothing)."""
    settings = [key for key in ("reviewers", "review_timeout", "on_review_timeout") if key in values]
    if values.get("review", "off") != "required":
        if settings:
            raise reader.error(reader.node_of(settings[0]), settings[0], "given without `review: required`",
                               "add `review: required`, or remove it")
        return None
    if "review" in values and not any(m.sent_outputs for m in values["models"]):
        raise reader.error(reader.node_of("review"), "review", "nothing of this flow is sent, so there is nothing to "
                           "review", "send a `dst` output somewhere, or remove `review`")
    return Review(reviewers=values.get("reviewers", ()), timeout=values.get("review_timeout"),
                  on_timeout=values.get("on_review_timeout", "reject"))


def _check_graph(reader: Reader, flow: Flow) -> None:
    """The models must run in an order, and every output must be read or sent."""
    try:
        model_order(flow)
        for model, name in unused_outputs(flow):
            unused = GraphError(f"output {name!r} of model {model!r} is never used",
                                "read it in another model's inputs, or name it dst* to send it",
                                model=model, mount="outputs", name=name)
            if not raddeploy.unused_outputs_allowed(reader, flow, model):
                raise unused
            line, fieldname = reader.mount_place(flow, unused)
            reader.warnings.append(FlowWarning(reader.path, line, fieldname, str(unused), unused.hint))
    except GraphError as exc:
        line, fieldname = reader.mount_place(flow, exc)
        raise FlowError(reader.path, line, fieldname, str(exc), exc.hint) from None
