"""Read a flow file's YAML node tree, keeping the line of every value for errors and warnings.

:class:`Reader` knows YAML shapes, not flow fields: it reads a section against its key table in
:mod:`.schema` (unknown keys, keys given twice, missing keys) and hands each value to the
converter of its ``kind`` (:mod:`.convert`), so every key of every section gets the same checks
and the same error shapes. It remembers the nodes it read by field path, so a later check (a
graph error, a contradiction of two spellings) can still name the line.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from raddeploy_provider.dicom.dictionary import keyword_dict

from raddeploy_provider.units import parse_duration

from .convert import CONVERTERS
from .errors import FlowError, FlowWarning
from .graph import GraphError
from .model import Flow
from .raddeploy import MOUNT_SPELLINGS, spelling_of
from .schema import keys_of


class Reader:
    """One flow file's node tree, the warnings found so far and the nodes read per field path."""

    def __init__(self, path: Path, root: yaml.Node | None) -> None:
        self.path = path
        self.root = root
        self.warnings: list[FlowWarning] = []
        #: How its trigger patterns match (``whole`` or ``search``), from the keys the file uses.
        self.spelling = spelling_of(root)
        self._nodes: dict[str, tuple[yaml.Node, yaml.Node]] = {}  # field path -> (key, value) nodes

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
        """Read a mapping against its schema table: key -> converted value.

        A model's required ``image`` is checked later: RadDeploy may give it in ``docker_kwargs``.
        """
        table = keys_of(section)
        keys = self.mapping(node, fieldname, set(table), refused)
        for name, key in table.items():
            if key.required and name not in keys and section != "models[]":
                raise self.error(node, f"{fieldname}.{name}" if fieldname else name, "missing",
                                 f"add `{name}:`" + (" at the top level" if not fieldname else ""))
        values = {}
        for name, (key_node, value_node) in keys.items():
            where = f"{fieldname}.{name}" if fieldname else name
            values[name] = CONVERTERS[table[name].kind](self, table[name], value_node, where)
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

    def mount_place(self, flow: Flow, exc: GraphError) -> tuple[int | None, str]:
        """The line and field of the mount a :class:`GraphError` is about (after the flow is read)."""
        names = [m.name for m in flow.models]
        if exc.model not in names or not isinstance(self.root, yaml.MappingNode):
            return None, "models"
        index = names.index(exc.model)
        top = {str(k.value): v for k, v in self.root.value}
        model_node = top["models"].value[index]
        where = f"models[{index}]"
        keys = {str(k.value): (k, v) for k, v in model_node.value}
        alias = MOUNT_SPELLINGS.get(exc.mount or "", "")
        key = exc.mount if exc.mount in keys else alias if alias in keys else None
        if key is None:
            return model_node.start_mark.line + 1, where
        key_node, value_node = keys[key]
        line = key_node.start_mark.line + 1
        for name_node, _ in value_node.value:
            if str(name_node.value) == exc.name:
                line = name_node.start_mark.line + 1
        return line, f"{where}.{key}"
