"""The flows folder as the listener sees it: edits take effect without a restart."""

from __future__ import annotations

import os
from pathlib import Path

from flow_factory import write
from raddeploy_provider.flows.registry import FlowRegistry


def flow(name: str, modality: str = "CT") -> str:
    return f"name: {name}\ntriggers: [{{Modality: {modality}}}]\nmodels: [{{image: a}}]\n"


def bump_mtime(path: Path) -> None:
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_reload_after_a_file_is_edited(tmp_path: Path) -> None:
    path = write(tmp_path, flow("First"), "a.yaml")
    registry = FlowRegistry(tmp_path, interval=0)
    first = registry.current()
    assert [f.dag_id for f in first.flows] == ["first"]
    assert registry.current() is first  # nothing changed: no reload

    write(tmp_path, flow("Second flow"), "a.yaml")
    assert [f.dag_id for f in registry.current().flows] == ["second_flow"]

    # an edit that keeps the size is seen through the modification time
    write(tmp_path, flow("Third flow ", modality="MR"), "a.yaml")
    bump_mtime(path)
    flows = registry.current().flows
    assert [f.dag_id for f in flows] == ["third_flow"]
    assert flows[0].triggers[0].conditions[0].patterns[0].source == "MR"


def test_added_broken_and_removed_files(tmp_path: Path) -> None:
    write(tmp_path, flow("A"), "a.yaml")
    registry = FlowRegistry(tmp_path, interval=0)
    assert [f.dag_id for f in registry.current().flows] == ["a"]

    broken = tmp_path / "b.yaml"
    broken.write_text("name: B\ntriggers: [{Modality: CT}]\nmodels: [{imgae: a}]\n")
    result = registry.current()
    assert [f.dag_id for f in result.flows] == ["a"]
    assert [str(e) for e in result.errors] == [
        f"{broken}:3: models[0].imgae: unknown key (did you mean `image`?)"]

    write(tmp_path, flow("B"), "b.yaml")
    result = registry.current()
    assert [f.dag_id for f in result.flows] == ["a", "b"] and result.errors == []

    (tmp_path / "a.yaml").unlink()
    assert [f.dag_id for f in registry.current().flows] == ["b"]


def test_interval_limits_how_often_the_folder_is_checked(tmp_path: Path) -> None:
    write(tmp_path, flow("Before"), "a.yaml")
    registry = FlowRegistry(tmp_path, interval=3600)
    assert [f.dag_id for f in registry.current().flows] == ["before"]
    write(tmp_path, flow("After the edit"), "a.yaml")
    assert [f.dag_id for f in registry.current().flows] == ["before"]  # not checked again yet
    registry.interval = 0
    assert [f.dag_id for f in registry.current().flows] == ["after_the_edit"]


def test_missing_folder_is_no_flows(tmp_path: Path) -> None:
    registry = FlowRegistry(tmp_path / "nope", interval=0)
    result = registry.current()
    assert result.flows == [] and result.errors == []
    (tmp_path / "nope").mkdir()
    write(tmp_path / "nope", flow("X"), "x.yml")
    assert [f.dag_id for f in registry.current().flows] == ["x"]
