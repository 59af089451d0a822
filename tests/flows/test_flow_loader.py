"""Loading flow files: both spellings into one model, durations, and errors that point home.

Every error test asserts the whole ``str(error)``: ``<file>:<line>: <field>: <message> (<hint>)``,
the shape editors and CI logs turn into links.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from flow_factory import write
from raddeploy_provider.flows import FlowError, load_flow, load_flows, matched_triggers, parse_duration
from raddeploy_provider.flows.model import Destination, Grouping, InputSpec, ModelSpec


def load_error(folder: Path, text: str, name: str = "flow.yaml") -> tuple[Path, FlowError]:
    path = write(folder, text, name)
    with pytest.raises(FlowError) as info:
        load_flow(path)
    return path, info.value


NATIVE = """
name: HN CT OARs
id: hn_ct_oars
version: "1.1"
description: Head and neck organs at risk on the planning CT
priority: 2
tags: [hn, oar]
triggers:
  - Modality: CT
    SeriesDescription: ["(?i)head|neck", "~(?i)scout"]
  - Modality: MR
    SeriesDescription: "(?i)t1"
grouping:
  quiet_period: 10s
  timeout: 30m
  on_timeout: proceed
input:
  layout: [Modality, SeriesInstanceUID]
  whole_series: false
models:
  - name: register
    image: registry.local/hn-reg@sha256:0123
    command: ["python", "/app/run.py"]
    environment: {THREADS: "4"}
    inputs: {src: /input}
    outputs: {ct_reg: /output}
    timeout: 20m
  - name: segment
    image: registry.local/hn-seg:1.1
    gpu: 2
    inputs: {ct_reg: /input}
    outputs: {dst: /output, dst_rtstruct: /rt}
    network: bridge
destinations:
  - connection: tps_eclipse
  - {host: 10.0.0.5, port: 104, ae_title: ARIA, calling_ae_title: RADDEPLOY}
"""


def test_native_form_loads_every_field(tmp_path: Path) -> None:
    flow = load_flow(write(tmp_path, NATIVE))

    assert flow.name == "HN CT OARs"
    assert flow.dag_id == "hn_ct_oars"
    assert flow.version == "1.1"
    assert flow.description == "Head and neck organs at risk on the planning CT"
    assert flow.source == tmp_path / "flow.yaml"
    assert re.fullmatch(r"[0-9a-f]{64}", flow.file_hash)

    first, second = flow.triggers
    assert [c.keyword for c in first.conditions] == ["Modality", "SeriesDescription"]
    desc = first.conditions[1].patterns
    assert [(p.source, p.exclude) for p in desc] == [("(?i)head|neck", False), ("(?i)scout", True)]
    assert first.describe() == "Modality=CT, SeriesDescription=(?i)head|neck, SeriesDescription!~(?i)scout"
    assert second.describe() == "Modality=MR, SeriesDescription=(?i)t1"

    assert flow.grouping == Grouping(quiet_period=10.0, timeout=1800.0, on_timeout="proceed")
    assert flow.input == InputSpec(layout=("Modality", "SeriesInstanceUID"), whole_series=False)

    register, segment = flow.models
    assert register == ModelSpec(
        name="register", image="registry.local/hn-reg@sha256:0123", command=("python", "/app/run.py"),
        environment={"THREADS": "4"}, inputs={"src": "/input"}, outputs={"ct_reg": "/output"},
        gpu=0, timeout=1200.0, network="none",
    )
    assert segment.gpu == 2
    assert segment.timeout is None
    assert segment.network == "bridge"
    assert segment.sent_outputs == ["dst", "dst_rtstruct"]
    assert register.sent_outputs == []

    assert flow.destinations == (
        Destination(connection="tps_eclipse"),
        Destination(host="10.0.0.5", port=104, ae_title="ARIA", calling_ae_title="RADDEPLOY"),
    )


def test_defaults_for_a_minimal_flow(tmp_path: Path) -> None:
    flow = load_flow(write(tmp_path, """
        name: "  Lung CT: GTV / OAR  "
        triggers:
          - Modality: CT
        models:
          - image: seg:1
    """))
    assert flow.dag_id == "lung_ct_gtv_oar"  # slug of the name
    assert flow.models[0].name == "model_0"
    assert flow.models[0].command is None
    assert flow.models[0].inputs == {} and flow.models[0].outputs == {}
    assert flow.grouping == Grouping()
    assert flow.input == InputSpec(layout=(), whole_series=True)
    assert flow.destinations == ()
    assert flow.version == "" and flow.description == ""


RADDEPLOY = """
name: Same flow
triggers:
  - Modality: ^CT$
    SeriesDescription: "~(?i)scout"
models:
  - docker_kwargs:
      image: registry.local/seg:2
      command: python /app/run.py --fast
      environment: {THREADS: 4, MODE: fast}
    input_mounts: {src: /input}
    output_mounts: {dst: /output}
    gpu: True
    timeout: 1200
destinations:
  - host: 10.0.0.5
    port: 104
    ae_title: ARIA
"""

NATIVE_TWIN = """
name: Same flow
triggers:
  - Modality: CT
    SeriesDescription: "~(?i).*scout.*"
models:
  - image: registry.local/seg:2
    command: python /app/run.py --fast
    environment: {THREADS: "4", MODE: fast}
    inputs: {src: /input}
    outputs: {dst: /output}
    gpu: 1
    timeout: 20m
destinations:
  - {host: 10.0.0.5, port: 104, ae_title: ARIA}
"""


def test_raddeploy_form_loads_into_the_same_model_as_native(tmp_path: Path) -> None:
    rad = load_flow(write(tmp_path, RADDEPLOY, "raddeploy.yaml"))
    native = load_flow(write(tmp_path, NATIVE_TWIN, "native.yml"))

    model = rad.models[0]
    assert model.image == "registry.local/seg:2"
    assert model.command == "python /app/run.py --fast"
    assert model.environment == {"THREADS": "4", "MODE": "fast"}  # numbers become text
    assert model.inputs == {"src": "/input"}
    assert model.outputs == {"dst": "/output"}
    assert model.gpu == 1  # True means one GPU
    assert model.timeout == 1200.0

    # the triggers differ in spelling only: RadDeploy's search anchored, the native whole value widened
    same = {"source": Path("x"), "file_hash": "", "triggers": (), "spelling": ""}
    assert dataclasses.replace(rad, **same) == dataclasses.replace(native, **same)
    assert rad.file_hash != native.file_hash
    assert (rad.spelling, native.spelling) == ("raddeploy", "native")
    for header in ({"Modality": "CT", "SeriesDescription": "Thorax"}, {"Modality": "CT", "SeriesDescription": "Scout 1"},
                   {"Modality": "RTSTRUCT", "SeriesDescription": "Thorax"}, {"Modality": "OCT"}):
        assert matched_triggers(rad, header) == matched_triggers(native, header)
    assert matched_triggers(native, {"Modality": "CT", "SeriesDescription": "Thorax"}) == [0]


def test_gpu_false_is_no_gpu(tmp_path: Path) -> None:
    flow = load_flow(write(tmp_path, """
        name: g
        triggers: [{Modality: CT}]
        models:
          - docker_kwargs: {image: a}
            gpu: false
    """))
    assert flow.models[0].gpu == 0


@pytest.mark.parametrize("value, seconds", [
    (90, 90.0), (2.5, 2.5), ("90", 90.0), ("90s", 90.0), ("30m", 1800.0), ("2h", 7200.0),
    ("1d", 86400.0), ("1.5h", 5400.0), (" 45 s ", 45.0), (0, 0.0),
])
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize("value", [
    "", "m", "10 minutes", "2w", "-5s", "1h30m", True, None, [10], -5, -0.5,
    float("nan"), float("inf"),
])
def test_parse_duration_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(value)


@pytest.mark.parametrize("written, seconds", [("90", 90.0), ("90s", 90.0), ("30m", 1800.0), ("2h", 7200.0)])
def test_durations_in_a_flow_file(tmp_path: Path, written: str, seconds: float) -> None:
    flow = load_flow(write(tmp_path, f"""
        name: d
        triggers: [{{Modality: CT}}]
        grouping: {{quiet_period: {written}, timeout: {written}}}
        models:
          - image: a
            timeout: {written}
    """))
    assert flow.grouping.quiet_period == seconds
    assert flow.grouping.timeout == seconds
    assert flow.models[0].timeout == seconds


def test_trigger_patterns_are_the_text_as_written(tmp_path: Path) -> None:
    # YAML 1.1 would turn 010 into 8, 1.10 into 1.1 and ON into True: a regex is text.
    flow = load_flow(write(tmp_path, """
        name: t
        triggers:
          - SeriesNumber: 010
            SliceThickness: 1.10
            BurnedInAnnotation: ON
        models:
          - image: a
    """))
    sources = [c.patterns[0].source for c in flow.triggers[0].conditions]
    assert sources == ["010", "1.10", "ON"]


# -- errors ----------------------------------------------------------------------------------

def test_unknown_top_level_key_suggests_the_right_one(tmp_path: Path) -> None:
    path, err = load_error(tmp_path, """
        name: typo
        trigers:
          - Modality: CT
        models:
          - image: a
    """)
    assert (err.file, err.line, err.field) == (path, 2, "trigers")
    assert str(err) == f"{path}:2: trigers: unknown key (did you mean `triggers`?)"


def test_unknown_model_key_suggests_the_right_one(tmp_path: Path) -> None:
    path, err = load_error(tmp_path, """
        name: typo
        triggers:
          - Modality: CT
        models:
          - name: seg
            imgae: a
    """)
    assert str(err) == f"{path}:6: models[0].imgae: unknown key (did you mean `image`?)"


def test_unknown_key_inside_docker_kwargs(tmp_path: Path) -> None:
    path, err = load_error(tmp_path, """
        name: typo
        triggers:
          - Modality: CT
        models:
          - docker_kwargs:
              image: a
              enviroment: {A: b}
    """)
    assert str(err) == f"{path}:7: models[0].docker_kwargs.enviroment: unknown key (did you mean `environment`?)"


def test_unknown_key_with_nothing_close_lists_the_allowed_ones(tmp_path: Path) -> None:
    path, err = load_error(tmp_path, """
        name: x
        triggers: [{Modality: CT}]
        grouping:
          zzz: 1
        models: [{image: a}]
    """)
    assert str(err) == f"{path}:4: grouping.zzz: unknown key (allowed: on_timeout, quiet_period, timeout)"


def test_bad_regex(tmp_path: Path) -> None:
    path, err = load_error(tmp_path, """
        name: regex
        triggers:
          - Modality: CT
          - SeriesDescription: ["(?i)t1", "~(scout"]
        models:
          - image: a
    """)
    with pytest.raises(re.error) as compiled:
        re.compile("(scout")
    assert str(err) == (f"{path}:4: triggers[1].SeriesDescription: bad regex '(scout': {compiled.value} "
                        "(fix the regular expression (quote it if it holds ':' or '#'))")


def test_invalid_yaml(tmp_path: Path) -> None:
    path, err = load_error(tmp_path, """
        name: broken
        triggers:
          - Modality: CT: MR
        models:
          - image: a
    """)
    assert str(err) == (f"{path}:3: (file): not valid YAML: mapping values are not allowed here "
                        "(check indentation and quoting around that line)")


def test_missing_required_top_level_key(tmp_path: Path) -> None:
    path, err = load_error(tmp_path, """
        name: no models
        triggers:
          - Modality: CT
    """)
    assert str(err) == f"{path}:1: models: missing (add `models:` at the top level)"


def test_model_without_image(tmp_path: Path) -> None:
    path, err = load_error(tmp_path, """
        name: no image
        triggers:
          - Modality: CT
        models:
          - image: a
          - name: second
            command: run
    """)
    assert str(err) == f"{path}:6: models[1].image: missing (name the Docker image the model runs)"


def test_empty_file(tmp_path: Path) -> None:
    path, err = load_error(tmp_path, "")
    assert str(err) == f"{path}: (file): the file is empty (a flow needs at least triggers and models)"


def test_bad_duration(tmp_path: Path) -> None:
    path, err = load_error(tmp_path, """
        name: duration
        triggers: [{Modality: CT}]
        grouping:
          quiet_period: 10 minutes
        models: [{image: a}]
    """)
    assert str(err) == (f"{path}:4: grouping.quiet_period: not a duration: '10 minutes' "
                        "(write seconds (90) or a number with s, m, h or d (30m))")


def test_negative_duration_is_an_error(tmp_path: Path) -> None:
    path, err = load_error(tmp_path, """
        name: duration
        triggers: [{Modality: CT}]
        models:
          - image: a
            timeout: -5
    """)
    assert str(err) == (f"{path}:5: models[0].timeout: not a duration: '-5' "
                        "(write seconds (90) or a number with s, m, h or d (30m))")


def test_bad_on_timeout(tmp_path: Path) -> None:
    path, err = load_error(tmp_path, """
        name: on timeout
        triggers: [{Modality: CT}]
        grouping:
          timeout: 30m
          on_timeout: retry
        models: [{image: a}]
    """)
    assert str(err) == f"{path}:5: grouping.on_timeout: unknown choice 'retry' (use one of skip, fail, proceed)"


def test_input_name_nobody_produces(tmp_path: Path) -> None:
    path, err = load_error(tmp_path, """
        name: dangling
        triggers: [{Modality: CT}]
        models:
          - name: register
            image: a
            inputs: {src: /input}
            outputs: {ct_reg: /output}
          - name: segment
            image: b
            inputs:
              ct_registered: /input
            outputs: {dst: /output}
    """)
    assert str(err) == (f"{path}:11: models[1].inputs: model 'segment' reads 'ct_registered', which no model "
                        "writes (use 'src' for the matched DICOM or an output name of another model)")


def test_input_name_nobody_produces_raddeploy_spelling(tmp_path: Path) -> None:
    path, err = load_error(tmp_path, """
        name: dangling
        triggers: [{Modality: CT}]
        models:
          - docker_kwargs: {image: a}
            input_mounts: {src: /input, atlas: /atlas}
    """)
    assert str(err) == (f"{path}:5: models[0].input_mounts: model 'model_0' reads 'atlas', which no model "
                        "writes (use 'src' for the matched DICOM or an output name of another model)")


def test_model_graph_cycle(tmp_path: Path) -> None:
    path, err = load_error(tmp_path, """
        name: cycle
        triggers: [{Modality: CT}]
        models:
          - name: a
            image: img/a
            inputs: {src: /input, b_out: /prev}
            outputs: {a_out: /output}
          - name: b
            image: img/b
            inputs: {a_out: /input}
            outputs: {b_out: /output}
    """)
    assert str(err) == (f"{path}:6: models[0].inputs: the models form a cycle: a -> b -> a "
                        "(a model cannot read, directly or not, what it writes)")


def test_output_written_twice(tmp_path: Path) -> None:
    path, err = load_error(tmp_path, """
        name: twice
        triggers: [{Modality: CT}]
        models:
          - name: a
            image: img/a
            outputs: {dst: /output}
          - name: b
            image: img/b
            outputs: {dst: /output}
    """)
    assert str(err) == (f"{path}:9: models[1].outputs: output 'dst' is written by both 'a' and 'b' "
                        "(give each output its own name)")


def test_dag_id_with_bad_characters(tmp_path: Path) -> None:
    path, err = load_error(tmp_path, """
        name: x
        id: my dag
        triggers: [{Modality: CT}]
        models: [{image: a}]
    """)
    assert str(err) == f"{path}:2: id: 'my dag' has characters a DAG id cannot hold (use letters, digits, '_', '.' and '-')"
    path, err = load_error(tmp_path, """
        name: x
        id: "my_dag\\n"
        triggers: [{Modality: CT}]
        models: [{image: a}]
    """)
    assert str(err) == f"{path}:2: id: 'my_dag\\n' has characters a DAG id cannot hold (use letters, digits, '_', '.' and '-')"


@pytest.mark.parametrize("models, expected", [
    ("[{image: a, gpu: -1}]", "3: models[0].gpu: not a GPU count: -1 (write true, false or a whole number)"),
    ("[{image: a, gpu: 1.5}]", "3: models[0].gpu: not a GPU count: 1.5 (write true, false or a whole number)"),
    ("[{name: 'seg ment', image: a}]", "3: models[0].name: 'seg ment' has characters a task id cannot hold "
                                        "(use letters, digits, '_', '.' and '-')"),
    ("[{name: a, image: x}, {name: a, image: y}]", "3: models[1].name: model name 'a' is used twice "
                                                     "(give each model its own name)"),
    ("[{image: a, docker_kwargs: {image: b}}]", "3: models[0].image: given both here and in docker_kwargs (keep one)"),
    ("[{image: a, inputs: {src: /i}, input_mounts: {src: /i}}]",
     "3: models[0].input_mounts: given with `inputs` (keep one)"),
    ("[]", "3: models: must be a non-empty list of models"),
])
def test_model_errors(tmp_path: Path, models: str, expected: str) -> None:
    path, err = load_error(tmp_path, f"""
        name: x
        triggers: [{{Modality: CT}}]
        models: {models}
    """)
    assert str(err) == f"{path}:{expected}"


@pytest.mark.parametrize("destinations, expected", [
    ("[{host: h, port: 104}]", "4: destinations[0].ae_title: missing "
                               "(give host, port and ae_title, or a `connection` id)"),
    ("[{host: h, port: 70000, ae_title: A}]", "4: destinations[0].port: not a TCP port: 70000"),
    ("[{host: h, port: true, ae_title: A}]", "4: destinations[0].port: not a TCP port: True"),
    ("[{hots: h}]", "4: destinations[0].hots: unknown key (did you mean `host`?)"),
])
def test_destination_errors(tmp_path: Path, destinations: str, expected: str) -> None:
    path, err = load_error(tmp_path, f"""
        name: x
        triggers: [{{Modality: CT}}]
        models: [{{image: a}}]
        destinations: {destinations}
    """)
    assert str(err) == f"{path}:{expected}"


@pytest.mark.parametrize("triggers, expected", [
    ("[]", "2: triggers: must be a non-empty list of triggers "
           "(each trigger maps DICOM keywords to regexes, e.g. `- Modality: CT`)"),
    ("[CT]", "2: triggers[0]: must be a mapping of DICOM keyword: regex"),
    ("[{Modality: }]", "2: triggers[0].Modality: empty pattern (write a regex, e.g. CT)"),
    ("[{Modality: []}]", "2: triggers[0].Modality: no pattern given (write a regex, e.g. CT)"),
])
def test_trigger_errors(tmp_path: Path, triggers: str, expected: str) -> None:
    path, err = load_error(tmp_path, f"""
        name: x
        triggers: {triggers}
        models: [{{image: a}}]
    """)
    assert str(err) == f"{path}:{expected}"


# -- a folder of flows -----------------------------------------------------------------------

def test_load_flows_reads_yaml_and_yml_recursively(tmp_path: Path) -> None:
    write(tmp_path, "name: A\ntriggers: [{Modality: CT}]\nmodels: [{image: a}]\n", "a.yaml")
    write(tmp_path, "name: B\ntriggers: [{Modality: MR}]\nmodels: [{image: b}]\n", "sub/dir/b.yml")
    write(tmp_path, "name: C\ntriggers: [{Modality: MR}]\nmodels: [{image: c}]\n", "notes.txt")
    result = load_flows(tmp_path)
    assert [f.dag_id for f in result.flows] == ["a", "b"]
    assert result.errors == []


def test_duplicate_dag_id_across_two_files(tmp_path: Path) -> None:
    first = write(tmp_path, "name: CT OARs\ntriggers: [{Modality: CT}]\nmodels: [{image: a}]\n", "a.yaml")
    second = write(tmp_path, "# copy of a.yaml\nname: Copy\nid: ct_oars\ntriggers: [{Modality: CT}]\n"
                             "models: [{image: b}]\n", "b.yaml")
    third = write(tmp_path, "name: CT oars\ntriggers: [{Modality: CT}]\nmodels: [{image: c}]\n", "c.yaml")
    write(tmp_path, "name: Other\ntriggers: [{Modality: MR}]\nmodels: [{image: d}]\n", "d.yaml")

    result = load_flows(tmp_path)

    assert [(f.dag_id, f.source) for f in result.flows] == [("ct_oars", first), ("other", tmp_path / "d.yaml")]
    assert [str(e) for e in result.errors] == [
        f"{second}:3: id: DAG id 'ct_oars' is already used by {first} (give one of the flows another `id`)",
        # no `id:` here: the id comes from the name, so the name's line is the one to edit
        f"{third}:1: id: DAG id 'ct_oars' is already used by {first} (give one of the flows another `id`)",
    ]


def test_a_broken_file_never_stops_the_others(tmp_path: Path) -> None:
    write(tmp_path, "name: Good\ntriggers: [{Modality: CT}]\nmodels: [{image: a}]\n", "1.yaml")
    bad = write(tmp_path, "name: Bad\ntriggers: [{Modality: '('}]\nmodels: [{image: a}]\n", "2.yaml")
    not_utf8 = tmp_path / "3.yaml"
    not_utf8.write_bytes("name: caf\u00e9\n".encode("latin-1"))
    write(tmp_path, "name: Also good\ntriggers: [{Modality: MR}]\nmodels: [{image: b}]\n", "4.yaml")

    result = load_flows(tmp_path)

    assert [f.dag_id for f in result.flows] == ["good", "also_good"]
    assert [(e.file, e.line, e.field) for e in result.errors] == [
        (bad, 2, "triggers[0].Modality"), (not_utf8, None, ""),
    ]
    assert str(result.errors[1]) == f"{not_utf8}: (file): not UTF-8 text (save the file as UTF-8)"


def test_load_flows_accepts_a_single_file(tmp_path: Path) -> None:
    path = write(tmp_path, "name: One\ntriggers: [{Modality: CT}]\nmodels: [{image: a}]\n")
    assert [f.dag_id for f in load_flows(path).flows] == ["one"]
