"""The model graph of a flow: which model feeds which, through named mounts.

A model depends on every model that writes one of its inputs; ``src`` (the matched DICOM)
comes from the fingerprint step. Used by the loader (to reject dangling names and cycles)
and by the DAG factory (to wire tasks), so both agree on one reading.
"""

from __future__ import annotations

from .model import SOURCE_MOUNT, Flow


class GraphError(ValueError):
    """The models' mounts do not form a DAG; ``hint`` says what to change.

    ``model``, ``mount`` (``inputs`` or ``outputs``) and ``name`` say where: the loader turns
    them into the line of the flow file to edit.
    """

    def __init__(self, message: str, hint: str, model: str | None = None, mount: str | None = None,
                 name: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint
        self.model = model
        self.mount = mount
        self.name = name


def producers(flow: Flow) -> dict[str, str]:
    """Output mount name -> the model that writes it."""
    out: dict[str, str] = {}
    for model in flow.models:
        for name in model.outputs:
            if name in out:
                raise GraphError(f"output {name!r} is written by both {out[name]!r} and {model.name!r}",
                                 "give each output its own name", model.name, "outputs", name)
            if name == SOURCE_MOUNT:
                raise GraphError(f"model {model.name!r} writes {SOURCE_MOUNT!r}, the name of the matched input",
                                 "pick another output name", model.name, "outputs", name)
            out[name] = model.name
    return out


def upstream(flow: Flow) -> dict[str, list[str]]:
    """Model name -> the models it reads from (empty: reads only ``src``)."""
    made_by = producers(flow)
    deps: dict[str, list[str]] = {}
    for model in flow.models:
        deps[model.name] = []
        for name in model.inputs:
            if name == SOURCE_MOUNT:
                continue
            if name not in made_by:
                raise GraphError(f"model {model.name!r} reads {name!r}, which no model writes",
                                 f"use {SOURCE_MOUNT!r} for the matched DICOM or an output name of another model",
                                 model.name, "inputs", name)
            if made_by[name] not in deps[model.name]:
                deps[model.name].append(made_by[name])
    return deps


def model_order(flow: Flow) -> list[str]:
    """Model names in an order where every model comes after those it reads from."""
    deps = upstream(flow)
    made_by = producers(flow)
    by_name = {model.name: model for model in flow.models}
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            # point at the input of the first model that the next one in the cycle writes
            mount = next(n for n in by_name[cycle[0]].inputs if made_by.get(n) == cycle[1])
            raise GraphError(f"the models form a cycle: {' -> '.join(cycle)}",
                             "a model cannot read, directly or not, what it writes",
                             cycle[0], "inputs", mount)
        state[name] = 1
        for dep in deps[name]:
            visit(dep, path + [name])
        state[name] = 2
        order.append(name)

    for model in flow.models:
        visit(model.name, [])
    return order
