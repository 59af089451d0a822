"""The model graph: who feeds whom through named mounts; cycles and dangling names refused."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

import pytest

from raddeploy_provider.flows.graph import GraphError, model_order, producers, upstream
from raddeploy_provider.flows.model import Condition, Flow, ModelSpec, Pattern, Trigger


def flow_of(*models: ModelSpec) -> Flow:
    trigger = Trigger((Condition("Modality", (Pattern("CT", re.compile("CT")),)),))
    return Flow(name="g", dag_id="g", source=Path("g.yaml"), triggers=(trigger,), models=models)


def m(name: str, inputs: tuple[str, ...] = ("src",), outputs: tuple[str, ...] = ()) -> ModelSpec:
    return ModelSpec(name=name, image=f"img/{name}", inputs={i: f"/in/{i}" for i in inputs},
                     outputs={o: f"/out/{o}" for o in outputs})


def test_chain_fan_out_and_fan_in() -> None:
    # listed out of order on purpose: the order comes from the mounts, not the file
    flow = flow_of(
        m("report", inputs=("seg_a", "seg_b"), outputs=("dst",)),
        m("seg_a", inputs=("reg",), outputs=("seg_a",)),
        m("register", inputs=("src",), outputs=("reg",)),
        m("seg_b", inputs=("reg", "src"), outputs=("seg_b",)),
    )
    assert producers(flow) == {"dst": "report", "seg_a": "seg_a", "reg": "register", "seg_b": "seg_b"}
    assert upstream(flow) == {"report": ["seg_a", "seg_b"], "seg_a": ["register"], "register": [],
                              "seg_b": ["register"]}
    order = model_order(flow)
    assert sorted(order) == ["register", "report", "seg_a", "seg_b"]
    for name, deps in upstream(flow).items():
        assert all(order.index(dep) < order.index(name) for dep in deps)


def test_two_inputs_from_one_model_is_one_dependency() -> None:
    flow = flow_of(m("a", outputs=("x", "y")), m("b", inputs=("x", "y")))
    assert upstream(flow) == {"a": [], "b": ["a"]}


def test_independent_models_all_read_src() -> None:
    flow = flow_of(m("a", outputs=("dst_a",)), m("b", outputs=("dst_b",)), m("c", inputs=()))
    assert upstream(flow) == {"a": [], "b": [], "c": []}
    assert model_order(flow) == ["a", "b", "c"]


def test_dangling_input() -> None:
    with pytest.raises(GraphError) as info:
        upstream(flow_of(m("a", outputs=("x",)), m("b", inputs=("y",))))
    assert str(info.value) == "model 'b' reads 'y', which no model writes"
    assert (info.value.model, info.value.mount, info.value.name) == ("b", "inputs", "y")


def test_output_written_by_two_models() -> None:
    with pytest.raises(GraphError) as info:
        producers(flow_of(m("a", outputs=("x",)), m("b", outputs=("x",))))
    assert str(info.value) == "output 'x' is written by both 'a' and 'b'"
    assert (info.value.model, info.value.mount, info.value.name) == ("b", "outputs", "x")


def test_writing_src_is_refused() -> None:
    with pytest.raises(GraphError) as info:
        producers(flow_of(m("a", outputs=("src",))))
    assert "writes 'src'" in str(info.value)
    assert info.value.hint == "pick another output name"


@pytest.mark.parametrize("models, cycle", [
    ((m("a", inputs=("a_out",), outputs=("a_out",)),), "a -> a"),
    ((m("a", inputs=("src", "b_out"), outputs=("a_out",)), m("b", inputs=("a_out",), outputs=("b_out",))),
     "a -> b -> a"),
    ((m("start", outputs=("s",)), m("x", inputs=("s", "z"), outputs=("x",)), m("y", inputs=("x",), outputs=("y",)),
      m("z", inputs=("y",), outputs=("z",))), "x -> z -> y -> x"),
])
def test_cycles(models: tuple[ModelSpec, ...], cycle: str) -> None:
    with pytest.raises(GraphError) as info:
        model_order(flow_of(*models))
    assert str(info.value) == f"the models form a cycle: {cycle}"
    assert info.value.hint == "a model cannot read, directly or not, what it writes"
    first, second = cycle.split(" -> ")[:2]
    # the error points at the input of the first model that the next one in the cycle writes
    assert info.value.model == first and info.value.mount == "inputs"
    assert producers(flow_of(*models))[info.value.name] == second


def test_task_edges_mirror_the_dag_shape() -> None:
    from raddeploy_provider.flows.graph import Edge, task_edges
    from raddeploy_provider.flows.model import Destination

    flow = flow_of(
        m("merge", inputs=("a", "b"), outputs=("dst", "dst_pdf")),
        m("left", inputs=("ct",), outputs=("a",)),
        m("prep", inputs=("src",), outputs=("ct",)),
        m("right", inputs=("ct", "src"), outputs=("b",)),
        m("side", inputs=(), outputs=("log",)),
    )
    flow = replace(flow, destinations=(Destination(host="h", port=104, ae_title="ARIA 1"),
                                       Destination(connection="tps")))
    assert task_edges(flow) == [
        Edge("fingerprint", "prep", ("src",)),
        Edge("fingerprint", "side", ()),
        Edge("prep", "left", ("ct",)),
        Edge("prep", "right", ("ct",)),
        Edge("left", "merge", ("a",)),
        Edge("right", "merge", ("b",)),
        Edge("merge", "send_0_ARIA_1", ("dst", "dst_pdf")),
        Edge("merge", "send_1_tps", ("dst", "dst_pdf")),
    ]
