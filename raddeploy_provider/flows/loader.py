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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from pydicom.datadict import keyword_dict

from .errors import FlowError, FlowWarning
from .graph import GraphError, model_order, unused_outputs
from .schema import DOCKER_KWARGS_REFUSED, Key, keys_of
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

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}
_MOUNT_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")
#: Names a mount cannot take: a mount is the folder ``<run>/<name>``, and these are the run folder
#: itself, its parent, and the folders the run keeps besides outputs (see operators/run_folder.py).
_RUN_FOLDER_NAMES = {".", "..", "input", "config", "sent"}


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
    parser = _Parser(path, node)
    flow = Flow(**parser.flow(), file_hash=hashlib.sha256(raw).hexdigest())
    try:
        model_order(flow)
        for model, name in unused_outputs(flow):
            # RadDeploy discarded such outputs, and its flows must load unchanged: warn there.
            unused = GraphError(f"output {name!r} of model {model!r} is never used",
                                "read it in another model's inputs, or name it dst* to send it",
                                model=model, mount="outputs", name=name)
            if model not in parser.raddeploy_outputs:
                raise unused
            line, fieldname = parser.mount_place(flow, unused)
            parser.warnings.append(FlowWarning(path, line, fieldname, str(unused), unused.hint))
    except GraphError as exc:
        line, fieldname = parser.mount_place(flow, exc)
        raise FlowError(path, line, fieldname, str(exc), exc.hint) from None
    return replace(flow, warnings=tuple(parser.warnings))


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


def parse_size(value: Any) -> int:
    """``"512m"``, ``"24g"``, ``"1.5g"`` or a number of bytes -> bytes; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int) and value > 0:
        return value
    match = _SIZE_RE.match(str(value))
    if not match or float(match.group(1)) <= 0:
        raise ValueError(value)
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def slug(text: str) -> str:
    """A DAG id from a flow name: lower case, runs of other characters become ``_``."""
    return re.sub(r"[^a-z0-9_.-]+", "_", text.strip().lower()).strip("_") or "flow"


class _Parser:
    """Turns the YAML node tree into model values, keeping line numbers for errors.

    Each section is read against its key table in :mod:`.schema`; ``convert`` turns a value
    of each ``kind`` into its Python form, so every key of every section gets the same
    checks and the same error shapes.
    """

    def __init__(self, path: Path, root: yaml.Node | None) -> None:
        self.path = path
        self.root = root
        self.warnings: list[FlowWarning] = []
        self._nodes: dict[str, tuple[yaml.Node, yaml.Node]] = {}  # field path -> (key, value) nodes
        self.raddeploy_outputs: set[str] = set()  # models whose outputs are spelled output_mounts

    # -- helpers -----------------------------------------------------------------------
    def error(self, node: yaml.Node | None, fieldname: str, message: str, hint: str = "") -> FlowError:
        line = node.start_mark.line + 1 if node is not None else None
        return FlowError(self.path, line, fieldname, message, hint)

    def warn(self, node: yaml.Node | None, fieldname: str, message: str, hint: str = "") -> None:
        line = node.start_mark.line + 1 if node is not None else None
        self.warnings.append(FlowWarning(self.path, line, fieldname, message, hint))

    def value(self, node: yaml.Node) -> Any:
        return yaml.SafeLoader("").construct_object(node, deep=True)  # plain values of one subtree

    def mapping(self, node: yaml.Node | None, fieldname: str, allowed: set[str],
                refused: dict[str, str] | None = None) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        if not isinstance(node, yaml.MappingNode):
            raise self.error(node, fieldname, "must be a mapping of key: value")
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            where = f"{fieldname}.{key}" if fieldname else key
            if refused and key in refused:
                raise self.error(key_node, where, "not allowed", refused[key])
            if key not in allowed:
                close = difflib.get_close_matches(key, sorted(allowed), n=1)
                hint = f"did you mean `{close[0]}`?" if close else f"allowed: {', '.join(sorted(allowed))}"
                raise self.error(key_node, where, "unknown key", hint)
            if key in out:
                raise self.error(key_node, where, "key given twice", "keep one of them")
            out[key] = (key_node, value_node)
        return out

    def section(self, node: yaml.Node | None, fieldname: str, section: str,
                refused: dict[str, str] | None = None) -> dict[str, Any]:
        """Read a mapping against its schema table: key -> converted value."""
        table = keys_of(section)
        keys = self.mapping(node, fieldname, set(table), refused)
        for name, key in table.items():
            if key.required and name not in keys and section != "models[]":
                raise self.error(node, f"{fieldname}.{name}" if fieldname else name, "missing",
                                 f"add `{name}:`" + (" at the top level" if not fieldname else ""))
        values = {}
        for name, (key_node, value_node) in keys.items():
            where = f"{fieldname}.{name}" if fieldname else name
            values[name] = self.convert(table[name], value_node, where)
            self._nodes[where] = (key_node, value_node)
        return values

    def node_of(self, where: str) -> yaml.Node | None:
        """The value node read for ``where`` (a dotted field path), for later errors."""
        found = self._nodes.get(where)
        return found[1] if found else None

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

    def keyword(self, node: yaml.Node, fieldname: str) -> str:
        keyword = str(node.value)
        if keyword not in keyword_dict:
            close = difflib.get_close_matches(keyword, list(keyword_dict), n=1, cutoff=0.75)
            hint = f"did you mean `{close[0]}`?" if close else "use a keyword of the DICOM dictionary, e.g. SeriesDescription"
            raise self.error(node, fieldname, f"unknown DICOM keyword {keyword!r}", hint)
        return keyword

    def convert(self, key: Key, node: yaml.Node, where: str) -> Any:
        """One value of one ``kind`` (see :mod:`.schema`) in its Python form."""
        kind = key.kind
        if kind in ("text", "dag_id", "task_id"):
            text = self.text(node, where)
            if kind != "text" and not _DAG_ID_RE.fullmatch(text):
                what = "a DAG id" if kind == "dag_id" else "a task id"
                raise self.error(node, where, f"{text!r} has characters {what} cannot hold",
                                 "use letters, digits, '_', '.' and '-'")
            return text
        if kind == "ae_title":
            text = self.text(node, where)
            if len(text) > 16 or "\\" in text:
                raise self.error(node, where, f"{text!r} is not an AE title", "use at most 16 characters, no backslash")
            return text
        if kind in ("count", "priority", "port"):
            value = self.scalar(node, where)
            low, high = {"count": (0, None), "priority": (0, 4), "port": (1, 65535)}[kind]
            if not isinstance(value, int) or isinstance(value, bool) or value < low or (high and value > high):
                what = {"count": "a whole number >= 0", "priority": "a priority from 0 to 4",
                        "port": "a TCP port"}[kind]
                raise self.error(node, where, f"not {what}: {value!r}")
            return value
        if kind == "bool":
            value = self.scalar(node, where)
            if not isinstance(value, bool):
                raise self.error(node, where, f"not true or false: {node.value!r}")
            return value
        if kind == "duration":
            return self.duration(node, where)
        if kind == "timeout":
            seconds = self.duration(node, where)
            if seconds <= 0:
                raise self.error(node, where, "a timeout must be longer than 0", "leave it out for no timeout")
            return seconds
        if kind == "path":
            text = self.text(node, where)
            if not text.startswith("/"):
                raise self.error(node, where, f"{text!r} is not an absolute path in the container",
                                 "write it from the root, e.g. /config/config.yaml")
            return text
        if kind == "size":
            try:
                return parse_size(self.scalar(node, where))
            except ValueError:
                raise self.error(node, where, f"not a size: {node.value!r}",
                                 "write bytes or a number with k, m or g (512m, 24g)") from None
        if kind == "choice":
            choice = str(self.scalar(node, where))
            if choice not in key.choices:
                raise self.error(node, where, f"unknown choice {choice!r}", f"use one of {', '.join(key.choices)}")
            return choice
        if kind == "network":
            choice = str(self.scalar(node, where))
            if choice not in key.choices:
                raise self.error(node, where, f"unknown network {choice!r}",
                                 "use none (the default) or bridge; the host's network is never given")
            return choice
        if kind == "command":
            value = self.value(node)
            if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
                return tuple(str(v) for v in value)
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                return str(value)
            raise self.error(node, where, "must be a string or a list of strings")
        if kind == "str_map":
            return self.str_map(node, where)
        if kind == "mounts":
            mounts = self.str_map(node, where)
            for (name_node, path_node), (name, path) in zip(node.value, mounts.items()):
                if not _MOUNT_NAME_RE.fullmatch(name):
                    raise self.error(name_node, f"{where}.{name}", "a mount name holds letters, digits, '_', '.', '-'")
                if name in _RUN_FOLDER_NAMES:  # a mount is the run folder's subfolder of that name
                    raise self.error(name_node, f"{where}.{name}", f"mount name {name!r} is reserved",
                                     "the run folder uses it itself; pick another name (the matched DICOM is `src`)")
                if not path.startswith("/"):
                    raise self.error(path_node, f"{where}.{name}", f"{path!r} is not an absolute path in the container",
                                     "write it from the root, e.g. /input")
            return mounts
        if kind == "static_mounts":
            return self.static_mounts(node, where)
        if kind == "gpu":
            value = self.scalar(node, where)
            if isinstance(value, str) and value.strip().isdigit():
                value = int(value)
            if isinstance(value, bool):
                return int(value)
            if isinstance(value, int) and value >= 0:
                return value
            raise self.error(node, where, f"not a GPU count: {value!r}", "write true, false or a whole number")
        if kind == "tags":
            items = node.value if isinstance(node, yaml.SequenceNode) else [node]
            return tuple(self.text(item, where) for item in items)
        if kind == "ports":
            items = node.value if isinstance(node, yaml.SequenceNode) else [node]
            return tuple(self.convert(Key("port", "port", ""), item, where) for item in items)
        if kind in ("keywords", "layout"):
            if kind == "layout" and isinstance(node, yaml.ScalarNode) and node.value == "flat":
                return ()
            if not isinstance(node, yaml.SequenceNode):
                raise self.error(node, where, "must be `flat` or a list of DICOM keywords" if kind == "layout"
                                 else "must be a list of DICOM keywords")
            return tuple(self.keyword(item, where) for item in node.value)
        if kind == "mapping":
            if not isinstance(node, yaml.MappingNode):
                raise self.error(node, where, "must be a mapping of key: value")
            return self.value(node)
        if kind == "any":
            return self.value(node)
        if kind == "triggers":
            return self.triggers(node)
        if kind == "grouping":
            return Grouping(**self.section(node, "grouping", "grouping"))
        if kind == "input":
            values = self.section(node, "input", "input")
            return InputSpec(**{"layout" if k == "layout" else k: v for k, v in values.items()})
        if kind == "models":
            return self.models(node)
        if kind == "destinations":
            return self.destinations(node)
        if kind == "docker_kwargs":
            return self.section(node, where, "docker_kwargs", DOCKER_KWARGS_REFUSED)
        raise AssertionError(f"schema kind {kind!r} has no converter")

    def static_mounts(self, node: yaml.Node, where: str) -> dict[str, str]:
        """``{name: /path}``, or RadDeploy's ``["name:/path", ...]`` / ``"name:/path"``."""
        if isinstance(node, yaml.MappingNode):
            pairs = [(str(k.value), str(self.scalar(v, f"{where}.{k.value}")), v) for k, v in node.value]
        else:
            items = node.value if isinstance(node, yaml.SequenceNode) else [node]
            pairs = []
            for item in items:
                text = str(self.scalar(item, where))
                name, sep, path = text.partition(":")
                if not sep or ":" in path:
                    raise self.error(item, where, f"{text!r} is not `name:/path`",
                                     "one colon between the asset name and the path in the container")
                pairs.append((name, path, item))
        out = {}
        for name, path, item in pairs:
            if not _MOUNT_NAME_RE.fullmatch(name) or name in (".", ".."):
                raise self.error(item, where, f"{name!r} cannot name an asset folder",
                                 "use letters, digits, '_', '.' and '-'")
            if not path.startswith("/"):
                raise self.error(item, where, f"{path!r} is not an absolute path in the container")
            out[name] = path
        return out

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
            raise self.error(None, "", "the file is empty", "a flow needs at least triggers and models")
        values = self.section(self.root, "", "flow")
        name = values.get("name", self.path.stem)
        ports: tuple[int, ...] = ()
        for spelling in ("return_to_sender", "return_to_sender_on_ports", "return_to_sender_on_port"):
            ports += values.get(spelling, ())
        layout = values["input"].layout if "input" in values else ()
        if "tar_subdir" in values:
            if layout:
                raise self.error(self.node_of("tar_subdir"), "tar_subdir", "given with `input.layout`", "keep one")
            layout = values["tar_subdir"]
        input_spec = values.get("input", InputSpec())
        if (values.get("destinations") or ports) and not any(m.sent_outputs for m in values["models"]):
            field = "destinations" if values.get("destinations") else "return_to_sender"
            node = self.node_of("destinations") or self.node_of(field) or self.root
            raise self.error(node, field, "results go somewhere, but no model writes a `dst` output",
                             "name the output to send `dst` (or `dst_<something>`)")
        return dict(
            name=name,
            dag_id=values.get("id", slug(name)),
            source=self.path,
            version=values.get("version", ""),
            description=values.get("description", ""),
            priority=values.get("priority", 0),
            tags=values.get("tags", ()),
            triggers=values["triggers"],
            models=values["models"],
            destinations=values.get("destinations", ()),
            grouping=values.get("grouping", Grouping()),
            input=InputSpec(layout=layout, whole_series=input_spec.whole_series),
            return_to_sender=tuple(dict.fromkeys(ports)),
            extra=values.get("extra", {}),
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
                keyword = self.keyword(key_node, f"{where}.{key_node.value}")
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

    def models(self, node: yaml.Node) -> tuple[ModelSpec, ...]:
        if not isinstance(node, yaml.SequenceNode) or not node.value:
            raise self.error(node, "models", "must be a non-empty list of models")
        raw = [self.section(item, f"models[{i}]", "models[]") for i, item in enumerate(node.value)]
        chained = [i for i, values in enumerate(raw) if "input_dir" in values or "output_dir" in values]
        models = [self.model(node.value[i], i, values, chain=(i, len(raw)) if chained else None)
                  for i, values in enumerate(raw)]
        names = [m.name for m in models]
        for i, name in enumerate(names):
            if names.index(name) != i:
                raise self.error(node.value[i], f"models[{i}].name", f"model name {name!r} is used twice",
                                 "give each model its own name")
        return tuple(models)

    def model(self, node: yaml.Node, index: int, values: dict[str, Any],
              chain: tuple[int, int] | None) -> ModelSpec:
        where = f"models[{index}]"
        docker: dict[str, Any] = dict(values.pop("docker_kwargs", {}))
        for key in list(docker):
            if key in values:
                raise self.error(self.node_of(f"{where}.{key}"), f"{where}.{key}", "given both here and in "
                                 "docker_kwargs", "keep one")
        if "image" not in values and "image" not in docker:
            raise self.error(node, f"{where}.image", "missing", "name the Docker image the model runs")
        fields: dict[str, Any] = {"name": values.get("name", f"model_{index}")}
        for native, raddeploy in (("inputs", "input_mounts"), ("outputs", "output_mounts")):
            if native in values and raddeploy in values:
                raise self.error(self.node_of(f"{where}.{raddeploy}"), f"{where}.{raddeploy}",
                                 f"given with `{native}`", "keep one")
            if raddeploy in values and native == "outputs":
                self.raddeploy_outputs.add(fields["name"])
            if native in values or raddeploy in values:
                fields[native] = values.pop(native) if native in values else values.pop(raddeploy)
            values.pop(raddeploy, None)
        if chain is not None:
            if "inputs" in fields or "outputs" in fields:
                raise self.error(node, where, "mixes mounts with the chained `input_dir`/`output_dir` form",
                                 "use input_mounts/output_mounts in every model, or in none")
            position, count = chain
            fields["inputs"] = {"src" if position == 0 else f"chain_{position - 1}": values.pop("input_dir", "/input")}
            fields["outputs"] = {"dst" if position == count - 1 else f"chain_{position}": values.pop("output_dir", "/output")}
        values.pop("input_dir", None)
        values.pop("output_dir", None)
        if values.pop("pull_before_exec", False):
            if values.get("pull", "always") != "always":
                raise self.error(self.node_of(f"{where}.pull"), f"{where}.pull", "contradicts pull_before_exec",
                                 "keep one")
            values["pull"] = "always"
        if "network_disabled" in docker:
            wanted = "none" if docker.pop("network_disabled") else "bridge"
            if values.setdefault("network", wanted) != wanted:
                raise self.error(self.node_of(f"{where}.network"), f"{where}.network",
                                 "contradicts docker_kwargs.network_disabled", "keep one")
        for key in ("image", "command", "entrypoint", "environment", "mem_limit", "shm_size", "user",
                    "working_dir", "labels", "ipc_mode"):
            if key in docker:
                values[key] = docker.pop(key)
        fields.update({k: v for k, v in values.items() if k != "name"})
        fields["host_config"] = docker  # what is left: CPU and IO limits, passed to Docker as given
        model = ModelSpec(**fields)
        self.check_model(model, where)
        return model

    def check_model(self, model: ModelSpec, where: str) -> None:
        image = model.image
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        if "@sha256:" not in image and tag in ("", "latest"):
            self.warn(self.node_of(f"{where}.image") or self.node_of(f"{where}.docker_kwargs.image"),
                      f"{where}.image", f"image {image!r} has a mutable tag",
                      "pin a version tag or a digest (@sha256:...) so every run uses the same model")
        if model.network != "none":
            self.warn(self.node_of(f"{where}.network") or self.node_of(f"{where}.docker_kwargs.network_disabled"),
                      f"{where}.network", f"model {model.name!r} can reach the network",
                      "leave `network` out unless the model must call out")

    def destinations(self, node: yaml.Node) -> tuple[Destination, ...]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.error(node, "destinations", "must be a list")
        out = []
        for i, item in enumerate(node.value):
            where = f"destinations[{i}]"
            values = self.section(item, where, "destinations[]")
            if "connection" in values:
                others = sorted(set(values) - {"connection", "calling_ae_title"})
                if others:
                    raise self.error(item, f"{where}.{others[0]}", "given with `connection`",
                                     "the connection holds host, port and AE title; keep one form")
                out.append(Destination(connection=values["connection"],
                                       calling_ae_title=values.get("calling_ae_title")))
                continue
            for required in ("host", "port", "ae_title"):
                if required not in values:
                    raise self.error(item, f"{where}.{required}", "missing",
                                     "give host, port and ae_title, or a `connection` id")
            out.append(Destination(**values))
        return tuple(out)
