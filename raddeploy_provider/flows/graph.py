"""The model graph of a flow: which model feeds which, through named mounts.

A model depends on every model that writes one of its inputs; ``src`` (the matched DICOM)
comes from the fingerprint step. Used by the loader (to reject dangling names and cycles),
by the DAG factory (to wire tasks) and by ``raddeploy graph``, so all agree on one reading.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .model import SOURCE_MOUNT, Destination, Flow

#: The task id of the fingerprint sensor, the first task of every flow's DAG.
SENSOR_TASK = "fingerprint"
#: The task id of the approval between the models and every send task (``review: required``).
REVIEW_TASK = "review"


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


@dataclass(frozen=True)
class Edge:
    """One dependency of the flow's DAG: ``downstream`` runs after ``upstream``.

    ``mounts`` names what flows along it: ``src`` from the fingerprint, the outputs of one
    model that the next reads, or the ``dst*`` outputs a send task sends (may be empty).
    """

    upstream: str
    downstream: str
    mounts: tuple[str, ...]


def send_task_id(index: int, destination: Destination) -> str:
    """The task id of the send task for ``flow.destinations[index]``."""
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", destination.connection or destination.ae_title or "node")
    return f"send_{index}_{label.strip('_') or 'node'}"


def return_task_id(port: int) -> str:
    """The task id of the send task back to the study's sender on ``port``."""
    return f"send_to_sender_{port}"


def send_task_ids(flow: Flow) -> list[str]:
    """Every send task of the flow: one per destination, one per return-to-sender port."""
    return ([send_task_id(i, dest) for i, dest in enumerate(flow.destinations)]
            + [return_task_id(port) for port in flow.return_to_sender])


def task_edges(flow: Flow) -> list[Edge]:
    """Every edge of the flow's DAG, grouped by upstream task in a topological order.

    ``fingerprint`` -> each model that reads only ``src`` (or nothing); a model -> each
    model that reads one of its outputs; each model with ``dst*`` outputs -> every send task,
    or, with ``review: required``, -> ``review`` -> every send task.
    """
    deps = upstream(flow)
    made_by = producers(flow)
    order = model_order(flow)
    by_name = {model.name: model for model in flow.models}
    edges = [Edge(SENSOR_TASK, name, tuple(n for n in by_name[name].inputs if n == SOURCE_MOUNT))
             for name in order if not deps[name]]
    sends = send_task_ids(flow)
    for name in order:
        for reader in order:
            if name in deps[reader]:
                edges.append(Edge(name, reader, tuple(n for n in by_name[reader].inputs if made_by.get(n) == name)))
        sent = tuple(by_name[name].sent_outputs)
        if sent:
            edges.extend(Edge(name, target, sent) for target in ([REVIEW_TASK] if flow.review else sends))
    if flow.review:
        reviewed = tuple(n for name in order for n in by_name[name].sent_outputs)
        edges.extend(Edge(REVIEW_TASK, send, reviewed) for send in sends)
    return edges


def unused_outputs(flow: Flow) -> list[tuple[str, str]]:
    """``(model, output)`` for each output no model reads and no destination gets (``dst*`` is sent)."""
    read = {name for model in flow.models for name in model.inputs}
    return [(model.name, name) for model in flow.models for name in model.outputs
            if name not in read and not name.startswith("dst")]
