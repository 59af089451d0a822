"""RadDeploy's spelling of a flow file, turned into the native fields.

RadDeploy flow files (its README, its own test flows, the flows clinics wrote for it) must
load unchanged. They spell these things differently from the native form:

- a model's ``image``, ``command``, ``environment`` and container settings sit in
  ``docker_kwargs``; ``network_disabled`` there is ``network``, and the settings the native
  form has no field for (CPU and IO limits) go to Docker as given (``ModelSpec.host_config``);
- ``input_mounts``/``output_mounts`` are ``inputs``/``outputs``; RadDeploy discarded outputs
  nobody read, so for such a model they are a warning, not an error;
- the old README form has no mounts: models with ``input_dir``/``output_dir`` run as a
  chain, each reading the previous one's output (the first reads ``src``, the last one's is sent);
- ``pull_before_exec: true`` is ``pull: always``;
- ``return_to_sender_on_ports`` and ``return_to_sender_on_port`` are ``return_to_sender``;
- ``tar_subdir`` is ``input.layout``;
- a model that gives no ``input_mounts``/``output_mounts`` has RadDeploy's defaults,
  ``{src: /input}`` and ``{dst: /output}``;
- trigger patterns search anywhere in a value (``re.search``), where the native spelling
  matches the whole value: a file that uses any RadDeploy key (:func:`spelling_of`) is read
  with RadDeploy's matching, so its triggers mean what they meant there.

One thing given in both spellings is an error ("keep one"), never a silent choice.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any

import yaml

from raddeploy_provider.store.layout import SOURCE_MOUNT

from .model import SEARCH, WHOLE, Flow, InputSpec
from .schema import keys_of

if TYPE_CHECKING:
    from .reader import Reader

#: Native mount key -> its RadDeploy spelling.
MOUNT_SPELLINGS = {"inputs": "input_mounts", "outputs": "output_mounts"}
#: The spellings of ``return_to_sender``; their ports add up.
RETURN_TO_SENDER = ("return_to_sender", "return_to_sender_on_ports", "return_to_sender_on_port")
#: ``docker_kwargs`` that are native model fields; the others become ``host_config``.
_NATIVE_DOCKER_KWARGS = ("image", "command", "entrypoint", "environment", "mem_limit", "shm_size", "user",
                         "working_dir", "labels", "ipc_mode")
#: RadDeploy's mounts of a model that gives none (its ``Model`` defaults).
DEFAULT_MOUNTS = {"inputs": {SOURCE_MOUNT: "/input"}, "outputs": {"dst": "/output"}}


def spelling_of(root: yaml.Node | None) -> str:
    """How the file's trigger patterns match: :data:`~.model.SEARCH` when it uses any RadDeploy
    key (top level or a model's), else :data:`~.model.WHOLE`. Read from the YAML tree before
    any value is converted, so the triggers know it."""
    if not isinstance(root, yaml.MappingNode):
        return WHOLE
    top = {str(k.value): v for k, v in root.value}
    models = top.get("models")
    items = models.value if isinstance(models, yaml.SequenceNode) else []
    return SEARCH if _uses_raddeploy_keys(root, "flow") or any(map(_raddeploy_model, items)) else WHOLE


def _uses_raddeploy_keys(node: yaml.Node | None, section: str) -> bool:
    """Does this mapping of ``section`` give a key only RadDeploy's spelling has?"""
    if not isinstance(node, yaml.MappingNode):
        return False
    table = keys_of(section)
    return any(table[name].raddeploy for name in (str(k.value) for k, _ in node.value) if name in table)


def _raddeploy_model(node: yaml.Node | None) -> bool:
    """A model written in RadDeploy's spelling (``docker_kwargs``, ``input_mounts``, ...): it has RadDeploy's defaults."""
    return _uses_raddeploy_keys(node, "models[]")


def model_fields(reader: Reader, nodes: list[yaml.Node], sections: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The :class:`~.model.ModelSpec` fields of each model, from its section values in either spelling.

    The models run as a chain when any of them gives ``input_dir`` or ``output_dir``.
    """
    chained = any("input_dir" in values or "output_dir" in values for values in sections)
    return [_fields(reader, node, index, values, (index, len(sections)) if chained else None)
            for index, (node, values) in enumerate(zip(nodes, sections))]


def _fields(reader: Reader, node: yaml.Node, index: int, values: dict[str, Any],
            chain: tuple[int, int] | None) -> dict[str, Any]:
    """One model's fields; ``chain``: its position in the chained form and the number of models."""
    where = f"models[{index}]"
    docker: dict[str, Any] = dict(values.pop("docker_kwargs", {}))
    for key in docker:
        if key in values:
            raise reader.error(reader.node_of(f"{where}.{key}"), f"{where}.{key}", "given both here and in "
                               "docker_kwargs", "keep one")
    if "image" not in values and "image" not in docker:
        raise reader.error(node, f"{where}.image", "missing", "name the Docker image the model runs")
    fields: dict[str, Any] = {"name": values.get("name", f"model_{index}")}
    for native, raddeploy in MOUNT_SPELLINGS.items():
        if native in values and raddeploy in values:
            raise reader.error(reader.node_of(f"{where}.{raddeploy}"), f"{where}.{raddeploy}",
                               f"given with `{native}`", "keep one")
        if native in values or raddeploy in values:
            fields[native] = values.pop(native) if native in values else values.pop(raddeploy)
        elif chain is None and _raddeploy_model(node):
            fields[native] = dict(DEFAULT_MOUNTS[native])
    if chain is not None:
        if "inputs" in fields or "outputs" in fields:
            raise reader.error(node, where, "mixes mounts with the chained `input_dir`/`output_dir` form",
                               "use input_mounts/output_mounts in every model, or in none")
        position, count = chain
        fields["inputs"] = {SOURCE_MOUNT if position == 0 else f"chain_{position - 1}":
                            values.pop("input_dir", "/input")}
        fields["outputs"] = {"dst" if position == count - 1 else f"chain_{position}":
                             values.pop("output_dir", "/output")}
    if values.pop("pull_before_exec", False):
        if values.get("pull", "always") != "always":
            raise reader.error(reader.node_of(f"{where}.pull"), f"{where}.pull", "contradicts pull_before_exec",
                               "keep one")
        values["pull"] = "always"
    if "network_disabled" in docker:
        wanted = "none" if docker.pop("network_disabled") else "bridge"
        if values.setdefault("network", wanted) != wanted:
            raise reader.error(reader.node_of(f"{where}.network"), f"{where}.network",
                               "contradicts docker_kwargs.network_disabled", "keep one")
    for key in _NATIVE_DOCKER_KWARGS:
        if key in docker:
            values[key] = docker.pop(key)
    fields.update({k: v for k, v in values.items() if k != "name"})
    fields["host_config"] = docker  # what is left: CPU and IO limits, passed to Docker as given
    return fields


def unused_outputs_allowed(reader: Reader, flow: Flow, model: str) -> bool:
    """Whether an output of ``model`` nobody reads is only a warning: its outputs are ``output_mounts``."""
    index = [m.name for m in flow.models].index(model)
    return reader.node_of(f"models[{index}].output_mounts") is not None


def return_ports(values: dict[str, Any]) -> tuple[int, ...]:
    """The ports of every spelling of ``return_to_sender`` in the top-level values, each once."""
    return tuple(dict.fromkeys(port for spelling in RETURN_TO_SENDER for port in values.get(spelling, ())))


def input_spec(reader: Reader, values: dict[str, Any]) -> InputSpec:
    """The top level's ``input``, with the layout ``tar_subdir`` gives (next to ``input.layout``: an error)."""
    spec = values.get("input", InputSpec())
    if "tar_subdir" in values:
        if spec.layout:
            raise reader.error(reader.node_of("tar_subdir"), "tar_subdir", "given with `input.layout`", "keep one")
        spec = replace(spec, layout=values["tar_subdir"])
    return spec
