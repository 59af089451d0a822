"""The converter table against the schema, and the mount names the run folder reserves."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from raddeploy_provider.flows import FlowError, load_flow
from raddeploy_provider.flows.convert import CONVERTERS, check_converters, text
from raddeploy_provider.flows.schema import SECTIONS, Key


def test_every_kind_of_the_schema_has_a_converter_and_every_converter_a_kind() -> None:
    assert set(CONVERTERS) == {key.kind for keys in SECTIONS.values() for key in keys}


def test_the_check_fires_on_a_kind_with_no_converter() -> None:
    schema = {**SECTIONS, "extra[]": (Key("colour", "colour", "A kind nobody converts."),)}
    with pytest.raises(RuntimeError, match=r"kinds with no converter: colour; converters of no kind: none"):
        check_converters(schema, CONVERTERS)


def test_the_check_fires_on_a_converter_of_no_kind() -> None:
    with pytest.raises(RuntimeError, match=r"kinds with no converter: none; converters of no kind: colour"):
        check_converters(SECTIONS, {**CONVERTERS, "colour": text})


@pytest.mark.parametrize("name", ["manifest.d", "manifest.json", ".manifest.lock"])
def test_mount_names_of_the_run_manifest_are_reserved(tmp_path: Path, name: str) -> None:
    # regression: these were accepted, and a mount is the folder <run>/<name>: the run's own manifest
    path = tmp_path / "flow.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: x
        triggers: [{{Modality: CT}}]
        models:
          - name: a
            image: 'a:1'
            inputs: {{src: /in}}
            outputs:
              '{name}': /out
          - {{name: b, image: 'b:1', inputs: {{'{name}': /in}}, outputs: {{dst: /out}}}}
    """), encoding="utf-8")
    with pytest.raises(FlowError) as info:
        load_flow(path)
    assert str(info.value) == (f"{path}:8: models[0].outputs.{name}: mount name {name!r} is reserved "
                               "(the run folder uses it itself; pick another name (the matched DICOM is `src`))")
