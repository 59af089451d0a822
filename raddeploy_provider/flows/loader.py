"""Load flow files (native or RadDeploy spelling) into :class:`~.model.Flow` objects.

Every problem becomes a :class:`FlowError` naming the file, the line and the field, so a
medical physicist can fix the file without reading our code. A broken file never stops the
others from loading: :func:`load_flows` returns the flows and the errors side by side.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import FlowError, FlowWarning
from .graph import GraphError, model_order
from .model import (
    Condition,
    Destination,
    Flow,
    Grouping,
    InputSpec,
    ModelSpec,
    Pattern,
    Trigger,
)

_DAG_ID_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNITS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}

FLOW_KEYS = {
    "name", "id", "version", "description", "priority", "tags", "triggers", "grouping",
    "input", "models", "destinations",
}
MODEL_KEYS = {
    "name", "image", "command", "environment", "inputs", "outputs", "gpu", "timeout",
    "network",
    # RadDeploy spelling
    "docker_kwargs", "input_mounts", "output_mounts",
}
DOCKER_KWARGS_KEYS = {"image", "command", "environment"}
GROUPING_KEYS = {"quiet_period", "timeout", "on_timeout"}
INPUT_KEYS = {"layout", "whole_series"}
DESTINATION_KEYS = {"host", "port", "ae_title", "calling_ae_title", "connection"}
ON_TIMEOUT = ("skip", "fail", "proceed")


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
    parser = _Parser(path, node)
    flow = Flow(**parser.flow(), file_hash=hashlib.sha256(raw).hexdigest())
    try:
        model_order(flow)
    except GraphError as exc:
        line, fieldname = parser.mount_place(flow, exc)
        raise FlowError(path, line, fieldname, str(exc), exc.hint) from None
    return flow


def parse_duration(value: Any) -> float:
    """``90``, ``"90s"``, ``"30m"``, ``"2h"`` -> seconds; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(value)
        return float(value)
    match = _DURATION_RE.match(str(value))
    if not match:
        raise ValueError(value)
    return float(match.group(1)) * _UNITS[match.group(2)]


def slug(text: str) -> str:
    """A DAG id from a flow name: lower case, runs of other characters become ``_``."""
    return re.sub(r"[^a-z0-9_.-]+", "_", text.strip().lower()).strip("_") or "flow"


class _Parser:
    """Turns the YAML node tree into model values, keeping line numbers for errors."""

    def __init__(self, path: Path, root: yaml.Node | None) -> None:
        self.path = path
        self.root = root

    # -- helpers -----------------------------------------------------------------------
    def error(self, node: yaml.Node | None, fieldname: str, message: str, hint: str = "") -> FlowError:
        line = node.start_mark.line + 1 if node is not None else None
        return FlowError(self.path, line, fieldname, message, hint)

    def value(self, node: yaml.Node) -> Any:
        return yaml.SafeLoader(  # construct plain Python values for one subtree
            ""
        ).construct_object(node, deep=True)

    def mapping(self, node: yaml.Node | None, fieldname: str, allowed: set[str]) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, fieldname, "must be a mapping of key: value")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            where = f"{fieldname}.{key}" if fieldname else key
            if key not in allowed:
                close = difflib.get_close_matches(key, sorted(allowed), n=1)
                hint = f"did you mean `{close[0]}`?" if close else f"allowed: {', '.join(sorted(allowed))}"
                raise self.error(key_node, where, "unknown key", hint)
            if key in out:
                raise self.error(key_node, where, "key given twice", "keep one of them")
            out[key] = (key_node, value_node)
        return out

    def scalar(self, node: yaml.Node, fieldname: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise self.error(node, fieldname, "must be a single value")
        return self.value(node)

    def text(self, node: yaml.Node, fieldname: str) -> str:
        value = self.scalar(node, fieldname)
        if value is None or value == "":
            raise self.error(node, fieldname, "must not be empty")
        return str(value)

    def duration(self, node: yaml.Node, fieldname: str) -> float:
        try:
            return parse_duration(self.scalar(node, fieldname))
        except ValueError:
            raise self.error(node, fieldname, f"not a duration: {node.value!r}",
                             "write seconds (90) or a number with s, m, h or d (30m)") from None

    def str_map(self, node: yaml.Node, fieldname: str) -> dict[str, str]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, fieldname, "must be a mapping of name: value")
        return {str(k.value): str(self.scalar(v, f"{fieldname}.{k.value}")) for k, v in node.value}

    def mount_place(self, flow: Flow, exc: GraphError) -> tuple[int | None, str]:
        """The line and field of the mount a :class:`GraphError` is about (after ``flow()``)."""
        names = [m.name for m in flow.models]
        if exc.model not in names or not isinstance(self.root, yaml.MappingNode):
            return None, "models"
        index = names.index(exc.model)
        top = {str(k.value): v for k, v in self.root.value}
        model_node = top["models"].value[index]
        where = f"models[{index}]"
        keys = {str(k.value): (k, v) for k, v in model_node.value}
        alias = {"inputs": "input_mounts", "outputs": "output_mounts"}.get(exc.mount or "", "")
        key = exc.mount if exc.mount in keys else alias if alias in keys else None
        if key is None:
            return model_node.start_mark.line + 1, where
        key_node, value_node = keys[key]
        line = key_node.start_mark.line + 1
        for name_node, _ in value_node.value:
            if str(name_node.value) == exc.name:
                line = name_node.start_mark.line + 1
        return line, f"{where}.{key}"

    # -- sections ----------------------------------------------------------------------
    def flow(self) -> dict[str, Any]:
        if self.root is None:
            raise self.error(None, "", "the file is empty", "a flow needs at least name, triggers and models")
        top = self.mapping(self.root, "", FLOW_KEYS)
        for required in ("name", "triggers", "models"):
            if required not in top:
                raise self.error(self.root, required, "missing", f"add `{required}:` at the top level")
        name = self.text(top["name"][1], "name")
        dag_id = slug(name)
        if "id" in top:
            dag_id = self.text(top["id"][1], "id")
            if not _DAG_ID_RE.fullmatch(dag_id):
                raise self.error(top["id"][1], "id", f"{dag_id!r} has characters a DAG id cannot hold",
                                 "use letters, digits, '_', '.' and '-'")
        models = self.models(top["models"][1])
        grouping = self.grouping(top["grouping"][1]) if "grouping" in top else Grouping()
        return dict(
            name=name,
            dag_id=dag_id,
            source=self.path,
            version=str(self.value(top["version"][1])) if "version" in top else "",
            description=str(self.value(top["description"][1]) or "") if "description" in top else "",
            triggers=self.triggers(top["triggers"][1]),
            models=models,
            destinations=self.destinations(top["destinations"][1]) if "destinations" in top else (),
            grouping=grouping,
            input=self.input(top["input"][1]) if "input" in top else InputSpec(),
        )

    def triggers(self, node: yaml.Node) -> tuple[Trigger, ...]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise self.error(node, "triggers", "must be a non-empty list of triggers",
                             "each trigger maps DICOM keywords to regexes, e.g. `- Modality: CT`")
        triggers = []
        for i, trig_node in enumerate(node.value):
            where = f"triggers[{i}]"
            if not isinstance(trig_node, yaml.MappingNode) or not trig_node.value:
                raise self.error(trig_node, where, "must be a mapping of DICOM keyword: regex")
            conditions = []
            for key_node, value_node in trig_node.value:
                keyword = str(key_node.value)
                conditions.append(Condition(keyword, self.patterns(value_node, f"{where}.{keyword}")))
            triggers.append(Trigger(tuple(conditions)))
        return tuple(triggers)

    def patterns(self, node: yaml.Node, fieldname: str) -> tuple[Pattern, ...]:
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        patterns = []
        for item in items:
            source = self.scalar(item, fieldname)
            if source is None:
                raise self.error(item, fieldname, "empty pattern", "write a regex, e.g. CT")
            source = str(item.value)  # the text as written: YAML would read 010 as 8 and ON as True
            exclude = source.startswith("~")
            expr = source[1:] if exclude else source
            try:
                regex = re.compile(expr)
            except re.error as exc:
                raise self.error(item, fieldname, f"bad regex {expr!r}: {exc}",
                                 "fix the regular expression (quote it if it holds ':' or '#')") from None
            patterns.append(Pattern(source=expr, regex=regex, exclude=exclude))
        if not patterns:
            raise self.error(node, fieldname, "no pattern given", "write a regex, e.g. CT")
        return tuple(patterns)

    def grouping(self, node: yaml.Node) -> Grouping:
        keys = self.mapping(node, "grouping", GROUPING_KEYS)
        values: dict[str, Any] = {}
        for key in ("quiet_period", "timeout"):
            if key in keys:
                values[key] = self.duration(keys[key][1], f"grouping.{key}")
        if "on_timeout" in keys:
            choice = str(self.scalar(keys["on_timeout"][1], "grouping.on_timeout"))
            if choice not in ON_TIMEOUT:
                raise self.error(keys["on_timeout"][1], "grouping.on_timeout", f"unknown choice {choice!r}",
                                 f"use one of {', '.join(ON_TIMEOUT)}")
            values["on_timeout"] = choice
        return Grouping(**values)

    def input(self, node: yaml.Node) -> InputSpec:
        keys = self.mapping(node, "input", INPUT_KEYS)
        layout: tuple[str, ...] = ()
        if "layout" in keys:
            value = self.value(keys["layout"][1])
            if value == "flat":
                layout = ()
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                layout = tuple(value)
            else:
                raise self.error(keys["layout"][1], "input.layout", "must be `flat` or a list of DICOM keywords")
        whole = bool(self.value(keys["whole_series"][1])) if "whole_series" in keys else True
        return InputSpec(layout=layout, whole_series=whole)

    def models(self, node: yaml.Node) -> tuple[ModelSpec, ...]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise self.error(node, "models", "must be a non-empty list of models")
        models = [self.model(item, i) for i, item in enumerate(node.value)]
        names = [m.name for m in models]
        for i, name in enumerate(names):
            if names.index(name) != i:
                raise self.error(node.value[i], f"models[{i}].name", f"model name {name!r} is used twice",
                                 "give each model its own name")
        return tuple(models)

    def model(self, node: yaml.Node, index: int) -> ModelSpec:
        where = f"models[{index}]"
        keys = self.mapping(node, where, MODEL_KEYS)
        fields: dict[str, Any] = {"name": f"model_{index}"}
        if "name" in keys:
            fields["name"] = self.text(keys["name"][1], f"{where}.name")
            if not _DAG_ID_RE.fullmatch(fields["name"]):
                raise self.error(keys["name"][1], f"{where}.name", "a model name becomes a task id",
                                 "use letters, digits, '_', '.' and '-'")
        docker = self.mapping(keys["docker_kwargs"][1], f"{where}.docker_kwargs", DOCKER_KWARGS_KEYS) \
            if "docker_kwargs" in keys else {}
        for key in ("image", "command", "environment"):
            if key in keys and key in docker:
                raise self.error(keys[key][0], f"{where}.{key}", "given both here and in docker_kwargs",
                                 "keep one")
        image_node = (keys.get("image") or docker.get("image") or (None, None))[1]
        if image_node is None:
            raise self.error(node, f"{where}.image", "missing", "name the Docker image the model runs")
        fields["image"] = self.text(image_node, f"{where}.image")
        command = keys.get("command") or docker.get("command")
        if command:
            value = self.value(command[1])
            if isinstance(value, list):
                fields["command"] = tuple(str(v) for v in value)
            elif value is not None:
                fields["command"] = str(value)
        env = keys.get("environment") or docker.get("environment")
        if env:
            fields["environment"] = self.str_map(env[1], f"{where}.environment")
        for native, raddeploy in (("inputs", "input_mounts"), ("outputs", "output_mounts")):
            if native in keys and raddeploy in keys:
                raise self.error(keys[raddeploy][0], f"{where}.{raddeploy}", f"given with `{native}`", "keep one")
            chosen = keys.get(native) or keys.get(raddeploy)
            if chosen:
                fields[native] = self.str_map(chosen[1], f"{where}.{chosen[0].value}")
        if "gpu" in keys:
            value = self.value(keys["gpu"][1])
            if isinstance(value, bool):
                fields["gpu"] = int(value)
            elif isinstance(value, int) and value >= 0:
                fields["gpu"] = value
            else:
                raise self.error(keys["gpu"][1], f"{where}.gpu", f"not a GPU count: {value!r}",
                                 "write true, false or a whole number")
        if "timeout" in keys:
            fields["timeout"] = self.duration(keys["timeout"][1], f"{where}.timeout")
        if "network" in keys:
            fields["network"] = self.text(keys["network"][1], f"{where}.network")
        return ModelSpec(**fields)

    def destinations(self, node: yaml.Node) -> tuple[Destination, ...]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(node, "destinations", "must be a list")
        out = []
        for i, item in enumerate(node.value):
            where = f"destinations[{i}]"
            keys = self.mapping(item, where, DESTINATION_KEYS)
            vals = {k: self.scalar(v, f"{where}.{k}") for k, (_, v) in keys.items()}
            if "connection" in vals:
                out.append(Destination(connection=str(vals["connection"])))
                continue
            for required in ("host", "port", "ae_title"):
                if vals.get(required) in (None, ""):
                    raise self.error(item, f"{where}.{required}", "missing",
                                     "give host, port and ae_title, or a `connection` id")
            port = vals["port"]
            if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
                raise self.error(keys["port"][1], f"{where}.port", f"not a TCP port: {port!r}")
            out.append(Destination(host=str(vals["host"]), port=port, ae_title=str(vals["ae_title"]),
                                   calling_ae_title=str(vals["calling_ae_title"]) if vals.get("calling_ae_title") else None))
        return tuple(out)

