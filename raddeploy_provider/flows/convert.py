"""The converters of flow file values: one per ``kind`` of the schema, in :data:`CONVERTERS`.

A converter ``(reader, key, node, where) -> value`` turns the YAML node of one key into its
Python form, or raises the :class:`~.errors.FlowError` that names the line and the field
(``where``). The composite sections (triggers, models, destinations, ...) are converters too,
reading their own keys through the :class:`~.reader.Reader`; how RadDeploy spelt a model is
:mod:`.raddeploy`'s.

The table is checked against :data:`.schema.SECTIONS` when this module is imported: a kind
the schema uses without a converter, or a converter no key uses, stops the import.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import yaml

from raddeploy_provider.store.layout import RunDir
from raddeploy_provider.units import parse_size

from . import raddeploy, terms
from .model import SEARCH, Condition, Destination, Grouping, InputSpec, ModelSpec, NotifySpec, Pattern, Trigger
from .schema import DOCKER_KWARGS_REFUSED, SECTIONS, Key

if TYPE_CHECKING:
    from .reader import Reader

Converter = Callable[["Reader", Key, yaml.Node, str], Any]

#: What a DAG id, a task id and a mount name may hold: each names a folder and an Airflow object.
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+$")


# -- single values ---------------------------------------------------------------------------
def text(reader: Reader, key: Key, node: yaml.Node, where: str) -> str:
    return reader.text(node, where)


def _identifier(what: str) -> Converter:
    """The converter of an id (``what``: "a DAG id") that only holds letters, digits, ``_.-``."""
    def convert(reader: Reader, key: Key, node: yaml.Node, where: str) -> str:
        value = reader.text(node, where)
        if not _NAME_RE.fullmatch(value):
            raise reader.error(node, where, f"{value!r} has characters {what} cannot hold",
                               "use letters, digits, '_', '.' and '-'")
        return value
    return convert


def ae_title(reader: Reader, key: Key, node: yaml.Node, where: str) -> str:
    value = reader.text(node, where)
    if len(value) > 16 or "\\" in value:
        raise reader.error(node, where, f"{value!r} is not an AE title", "use at most 16 characters, no backslash")
    return value


def _whole_number(low: int, high: int | None, what: str) -> Converter:
    """The converter of whole numbers from ``low`` to ``high`` (None: no limit); ``what`` names them."""
    def convert(reader: Reader, key: Key, node: yaml.Node, where: str) -> int:
        value = reader.scalar(node, where)
        if not isinstance(value, int) or isinstance(value, bool) or value < low or (high and value > high):
            raise reader.error(node, where, f"not {what}: {value!r}")
        return value
    return convert


_port = _whole_number(1, 65535, "a TCP port")


def boolean(reader: Reader, key: Key, node: yaml.Node, where: str) -> bool:
    value = reader.scalar(node, where)
    if not isinstance(value, bool):
        raise reader.error(node, where, f"not true or false: {node.value!r}")
    return value


def duration(reader: Reader, key: Key, node: yaml.Node, where: str) -> float:
    return reader.duration(node, where)


def timeout(reader: Reader, key: Key, node: yaml.Node, where: str) -> float:
    """A duration longer than 0: no timeout is written by leaving the key out."""
    seconds = reader.duration(node, where)
    if seconds <= 0:
        raise reader.error(node, where, "a timeout must be longer than 0", "leave it out for no timeout")
    return seconds


def path(reader: Reader, key: Key, node: yaml.Node, where: str) -> str:
    value = reader.text(node, where)
    if not value.startswith("/"):
        raise reader.error(node, where, f"{value!r} is not an absolute path in the container",
                           "write it from the root, e.g. /config/config.yaml")
    return value


def size(reader: Reader, key: Key, node: yaml.Node, where: str) -> int:
    try:
        return parse_size(reader.scalar(node, where))
    except ValueError:
        raise reader.error(node, where, f"not a size: {node.value!r}",
                           "write bytes or a number with k, m or g (512m, 24g)") from None


def _choice(what: str, hint: str | None = None) -> Converter:
    """The converter of one of ``key.choices``; without ``hint`` the error lists them."""
    def convert(reader: Reader, key: Key, node: yaml.Node, where: str) -> str:
        value = str(reader.scalar(node, where))
        if value not in key.choices:
            raise reader.error(node, where, f"unknown {what} {value!r}", hint or f"use one of {', '.join(key.choices)}")
        return value
    return convert


def command(reader: Reader, key: Key, node: yaml.Node, where: str) -> tuple[str, ...] | str:
    """A string (split like a shell when the container starts) or a list of arguments."""
    value = reader.value(node)
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return tuple(str(v) for v in value)
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise reader.error(node, where, "must be a string or a list of strings")


def str_map(reader: Reader, key: Key, node: yaml.Node, where: str) -> dict[str, str]:
    return reader.str_map(node, where)


def mounts(reader: Reader, key: Key, node: yaml.Node, where: str) -> dict[str, str]:
    """Mount name -> absolute path. A mount is the run folder's subfolder of that name, so the
    names the run folder holds itself (:attr:`RunDir.RESERVED`) are refused."""
    found = reader.str_map(node, where)
    for (name_node, path_node), (name, value) in zip(node.value, found.items()):
        if not _NAME_RE.fullmatch(name):
            raise reader.error(name_node, f"{where}.{name}", "a mount name holds letters, digits, '_', '.', '-'")
        if name in RunDir.RESERVED:
            raise reader.error(name_node, f"{where}.{name}", f"mount name {name!r} is reserved",
                               "the run folder uses it itself; pick another name (the matched DICOM is `src`)")
        if not value.startswith("/"):
            raise reader.error(path_node, f"{where}.{name}", f"{value!r} is not an absolute path in the container",
                               "write it from the root, e.g. /input")
    return found


def static_mounts(reader: Reader, key: Key, node: yaml.Node, where: str) -> dict[str, str]:
    """``{name: /path}``, or RadDeploy's ``["name:/path", ...]`` / ``"name:/path"``."""
    if isinstance(node, yaml.MappingNode):
        pairs = [(str(k.value), str(reader.scalar(v, f"{where}.{k.value}")), v) for k, v in node.value]
    else:
        items = node.value if isinstance(node, yaml.SequenceNode) else [node]
        pairs = []
        for item in items:
            written = str(reader.scalar(item, where))
            name, sep, value = written.partition(":")
            if not sep or ":" in value:
                raise reader.error(item, where, f"{written!r} is not `name:/path`",
                                   "one colon between the asset name and the path in the container")
            pairs.append((name, value, item))
    out = {}
    for name, value, item in pairs:
        if not _NAME_RE.fullmatch(name) or name in (".", ".."):
            raise reader.error(item, where, f"{name!r} cannot name an asset folder",
                               "use letters, digits, '_', '.' and '-'")
        if not value.startswith("/"):
            raise reader.error(item, where, f"{value!r} is not an absolute path in the container")
        out[name] = value
    return out


def gpu(reader: Reader, key: Key, node: yaml.Node, where: str) -> int:
    """``true`` is one GPU, ``false`` none, a whole number (or its text) that many."""
    value = reader.scalar(node, where)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and value >= 0:
        return value
    raise reader.error(node, where, f"not a GPU count: {value!r}", "write true, false or a whole number")


def _items(node: yaml.Node) -> list[yaml.Node]:
    """The items of a list, where one value may stand for a list of one."""
    return node.value if isinstance(node, yaml.SequenceNode) else [node]


def tags(reader: Reader, key: Key, node: yaml.Node, where: str) -> tuple[str, ...]:
    return tuple(reader.text(item, where) for item in _items(node))


def ports(reader: Reader, key: Key, node: yaml.Node, where: str) -> tuple[int, ...]:
    return tuple(_port(reader, key, item, where) for item in _items(node))


def _keyword_list(reader: Reader, node: yaml.Node, where: str, shape: str) -> tuple[str, ...]:
    if not isinstance(node, yaml.SequenceNode):
        raise reader.error(node, where, shape)
    return tuple(reader.keyword(item, where) for item in node.value)


def keywords(reader: Reader, key: Key, node: yaml.Node, where: str) -> tuple[str, ...]:
    return _keyword_list(reader, node, where, "must be a list of DICOM keywords")


def layout(reader: Reader, key: Key, node: yaml.Node, where: str) -> tuple[str, ...]:
    """``flat`` (no folders: ``()``) or DICOM keywords whose values name nested folders."""
    if isinstance(node, yaml.ScalarNode) and node.value == "flat":
        return ()
    return _keyword_list(reader, node, where, "must be `flat` or a list of DICOM keywords")


def mapping(reader: Reader, key: Key, node: yaml.Node, where: str) -> dict[str, Any]:
    if not isinstance(node, yaml.MappingNode):
        raise reader.error(node, where, "must be a mapping of key: value")
    return reader.value(node)


def anything(reader: Reader, key: Key, node: yaml.Node, where: str) -> Any:
    return reader.value(node)


# -- sections --------------------------------------------------------------------------------
def triggers(reader: Reader, key: Key, node: yaml.Node, where: str) -> tuple[Trigger, ...]:
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise reader.error(node, where, "must be a non-empty list of triggers",
                           "each trigger maps DICOM keywords to regexes, e.g. `- Modality: CT`")
    out = []
    for i, trig_node in enumerate(node.value):
        place = f"{where}[{i}]"
        if not isinstance(trig_node, yaml.MappingNode) or not trig_node.value:
            raise reader.error(trig_node, place, "must be a mapping of DICOM keyword: regex")
        conditions = []
        for key_node, value_node in trig_node.value:
            keyword = reader.keyword(key_node, f"{place}.{key_node.value}")
            conditions.append(Condition(keyword, _patterns(reader, value_node, f"{place}.{keyword}")))
            _warn_overlaps(reader, conditions[-1], value_node, f"{place}.{keyword}")
        out.append(Trigger(tuple(conditions)))
    return tuple(out)


def _patterns(reader: Reader, node: yaml.Node, where: str) -> tuple[Pattern, ...]:
    """One regex or a list; ``~`` in front makes it an exclusion. Read as written, not as YAML
    would (``010`` is not 8, ``ON`` is not true)."""
    patterns = []
    for item in _items(node):
        if reader.scalar(item, where) is None:
            raise reader.error(item, where, "empty pattern", "write a regex, e.g. CT")
        source = str(item.value)
        exclude = source.startswith("~")
        expr = source[1:] if exclude else source
        try:
            regex = re.compile(expr)
        except re.error as exc:
            raise reader.error(item, where, f"bad regex {expr!r}: {exc}",
                               "fix the regular expression (quote it if it holds ':' or '#')") from None
        patterns.append(Pattern(source=expr, regex=regex, exclude=exclude, match=reader.spelling))
    if not patterns:
        raise reader.error(node, where, "no pattern given", "write a regex, e.g. CT")
    return tuple(patterns)


def _warn_overlaps(reader: Reader, condition: Condition, node: yaml.Node, where: str) -> None:
    """A searching pattern (RadDeploy spelling) that matches several defined terms: say which, and how to anchor."""
    for pattern in condition.patterns:
        found = terms.overlaps(condition.keyword, pattern)
        if pattern.match == SEARCH and found:
            shown = ", ".join(found[:8]) + (f" and {len(found) - 8} more" if len(found) > 8 else "")
            tilde = "~" if pattern.exclude else ""
            reader.warn(node, where, f"pattern {tilde + pattern.source!r} {'excludes' if pattern.exclude else 'matches'} "
                        f"{condition.keyword} {shown} (RadDeploy flow files search anywhere in the value)",
                        f"anchor it to match one value: {tilde + terms.anchored(pattern.source)!r}")


def events(reader: Reader, key: Key, node: yaml.Node, where: str) -> tuple[str, ...]:
    """One of ``key.choices`` or a list of them, each once."""
    out = []
    for item in _items(node):
        value = str(reader.scalar(item, where))
        if value not in key.choices:
            raise reader.error(item, where, f"unknown event {value!r}", f"use {', '.join(key.choices)}")
        if value not in out:
            out.append(value)
    return tuple(out)


def notify(reader: Reader, key: Key, node: yaml.Node, where: str) -> NotifySpec:
    return NotifySpec(**reader.section(node, where, "notify"))


def grouping(reader: Reader, key: Key, node: yaml.Node, where: str) -> Grouping:
    return Grouping(**reader.section(node, where, "grouping"))


def input_section(reader: Reader, key: Key, node: yaml.Node, where: str) -> InputSpec:
    return InputSpec(**reader.section(node, where, "input"))


def docker_kwargs(reader: Reader, key: Key, node: yaml.Node, where: str) -> dict[str, Any]:
    """The allow-listed keys; those that would weaken the host's isolation are refused with a reason."""
    return reader.section(node, where, "docker_kwargs", DOCKER_KWARGS_REFUSED)


def models(reader: Reader, key: Key, node: yaml.Node, where: str) -> tuple[ModelSpec, ...]:
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise reader.error(node, "models", "must be a non-empty list of models")
    sections = [reader.section(item, f"models[{i}]", "models[]") for i, item in enumerate(node.value)]
    out = []
    for i, fields in enumerate(raddeploy.model_fields(reader, node.value, sections)):
        out.append(ModelSpec(**fields))
        _check_model(reader, out[-1], f"models[{i}]")
    names = [m.name for m in out]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise reader.error(node.value[i], f"models[{i}].name", f"model name {name!r} is used twice",
                               "give each model its own name")
    return tuple(out)


def _check_model(reader: Reader, model: ModelSpec, where: str) -> None:
    """Warn of what makes runs differ or lets a model out: a mutable image tag, a network."""
    image = model.image
    tag = image.rsplit("/", 1)[-1].partition(":")[2]
    if "@sha256:" not in image and tag in ("", "latest"):
        reader.warn(reader.node_of(f"{where}.image") or reader.node_of(f"{where}.docker_kwargs.image"),
                    f"{where}.image", f"image {image!r} has a mutable tag",
                    "pin a version tag or a digest (@sha256:...) so every run uses the same model")
    if model.network != "none":
        reader.warn(reader.node_of(f"{where}.network") or reader.node_of(f"{where}.docker_kwargs.network_disabled"),
                    f"{where}.network", f"model {model.name!r} can reach the network",
                    "leave `network` out unless the model must call out")


def destinations(reader: Reader, key: Key, node: yaml.Node, where: str) -> tuple[Destination, ...]:
    """Each destination is a ``connection`` id or host, port and AE title, never both."""
    if not isinstance(node, yaml.SequenceNode):
        raise reader.error(node, where, "must be a list")
    out = []
    for i, item in enumerate(node.value):
        place = f"{where}[{i}]"
        values = reader.section(item, place, "destinations[]")
        if "connection" in values:
            others = sorted(set(values) - {"connection", "calling_ae_title"})
            if others:
                raise reader.error(item, f"{place}.{others[0]}", "given with `connection`",
                                   "the connection holds host, port and AE title; keep one form")
            out.append(Destination(connection=values["connection"], calling_ae_title=values.get("calling_ae_title")))
            continue
        for required in ("host", "port", "ae_title"):
            if required not in values:
                raise reader.error(item, f"{place}.{required}", "missing",
                                   "give host, port and ae_title, or a `connection` id")
        out.append(Destination(**values))
    return tuple(out)


CONVERTERS: dict[str, Converter] = {
    "text": text,
    "dag_id": _identifier("a DAG id"),
    "task_id": _identifier("a task id"),
    "ae_title": ae_title,
    "count": _whole_number(0, None, "a whole number >= 0"),
    "priority": _whole_number(0, 4, "a priority from 0 to 4"),
    "port": _port,
    "bool": boolean,
    "duration": duration,
    "timeout": timeout,
    "path": path,
    "size": size,
    "choice": _choice("choice"),
    "network": _choice("network", "use none (the default) or bridge; the host's network is never given"),
    "command": command,
    "str_map": str_map,
    "mounts": mounts,
    "static_mounts": static_mounts,
    "gpu": gpu,
    "tags": tags,
    "ports": ports,
    "keywords": keywords,
    "layout": layout,
    "mapping": mapping,
    "any": anything,
    "triggers": triggers,
    "grouping": grouping,
    "notify": notify,
    "events": events,
    "input": input_section,
    "models": models,
    "destinations": destinations,
    "docker_kwargs": docker_kwargs,
}


def check_converters(sections: Mapping[str, Sequence[Key]], converters: Mapping[str, Converter]) -> None:
    """Raise :class:`RuntimeError` unless the kinds of ``sections`` are exactly the keys of ``converters``."""
    kinds = {key.kind for keys in sections.values() for key in keys}
    missing, unused = sorted(kinds - set(converters)), sorted(set(converters) - kinds)
    if missing or unused:
        raise RuntimeError("the flow schema and its converters disagree: "
                           f"kinds with no converter: {', '.join(missing) or 'none'}; "
                           f"converters of no kind: {', '.join(unused) or 'none'} "
                           "(give each kind of schema.SECTIONS one in convert.CONVERTERS, and no other)")


check_converters(SECTIONS, CONVERTERS)
