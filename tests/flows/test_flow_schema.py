"""The whole flow format against its schema: every key of both spellings, every error, the docs.

``test_flow_loader.py`` covers the loader's basics; here every key of ``schema.SECTIONS``
is exercised, flows are written the way RadDeploy users wrote them (its README and its own
test flows), and every documented example is loaded, so the reference cannot be wrong.
Errors and warnings are asserted as their whole ``str()``: ``file:line: field: message (hint)``.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from flow_factory import ensemble_flow, write
from raddeploy_provider.flows import FlowError, load_flow, load_flows
from raddeploy_provider.flows import docs as flow_docs
from raddeploy_provider.flows.model import (
    Condition,
    Destination,
    Flow,
    Grouping,
    InputSpec,
    ModelSpec,
    SEARCH,
    WHOLE,
    Pattern,
    Trigger,
)
from raddeploy_provider.flows.schema import DOCKER_KWARGS_REFUSED, SECTIONS, Key

REPO = Path(__file__).resolve().parents[2]
GiB = 1024**3
MiB = 1024**2


def error_of(folder: Path, text: str, name: str = "flow.yaml") -> str:
    """``str()`` of the error the file has, with its path written as ``F``."""
    path = write(folder, text, name)
    with pytest.raises(FlowError) as info:
        load_flow(path)
    return str(info.value).replace(str(path), "F")


def trigger(*conditions: tuple[str, list[str]], match: str = WHOLE) -> Trigger:
    """A trigger as the loader builds it: ``("Modality", ["CT", "~(?i)scout"])``; ``match``:
    :data:`SEARCH` for a RadDeploy flow file."""
    return Trigger(tuple(
        Condition(keyword, tuple(Pattern(p.lstrip("~"), re.compile(p.lstrip("~")), p.startswith("~"), match)
                                 for p in patterns))
        for keyword, patterns in conditions
    ))


def overlap(path: Path, line: int, where: str, pattern: str, terms: str, anchored: str) -> str:
    """The warning of a RadDeploy pattern that matches several defined terms."""
    return (f"{path}:{line}: {where}: pattern {pattern!r} matches {terms} (RadDeploy flow files search anywhere "
            f"in the value) (anchor it to match one value: {anchored!r})")


CT_TERMS = "Modality CT, CTPROTOCOL, IVOCT, OCT, RTSTRUCT"


def comparable(flow: Flow) -> Flow:
    """The flow without what depends on the file's bytes (its hash) or is checked apart (warnings)."""
    return dataclasses.replace(flow, file_hash="", warnings=())


MUTABLE = "pin a version tag or a digest (@sha256:...) so every run uses the same model"
NETWORK = "leave `network` out unless the model must call out"


# -- RadDeploy spelling: every field ----------------------------------------------------------

RADDEPLOY_FULL = """
name: FancyFlow
version: "1.02"
priority: 4
return_to_sender_on_ports:
  - 104
  - 11112
triggers:
  - Modality: ["CT"]
    SeriesDescription: ["Head|Neck|Brain"]
  - SOPClassUID: ["1.2.840.10008.5.1.4.1.1.4"]
    StudyDescription: ["(?i)AutoSegProtocol", "~FLAIR"]
tar_subdir:
  - SOPClassUID
  - SeriesInstanceUID
extra:
  INTERESTING_PARAMETER: FooBar
  USED_FOR_CUSTOM_SERVICE: 3
models:
  - docker_kwargs:
      image: registry.local/hn-seg:2.1
      command: sh -c 'echo $CONTAINER_ORDER; cp -r /input/* /output/'
      environment:
        CONTAINER_ORDER: 0
        MODE: fast
      mem_limit: 8g
      shm_size: 2g
      user: "1000:1000"
      working_dir: /app
      labels: {team: physics}
      network_disabled: false
      ipc_mode: shareable
      cpu_shares: 512
      cpu_period: 100000
      cpu_quota: 200000
      cpu_rt_period: 1000000
      cpu_rt_runtime: 950000
      cpuset_cpus: "0-3"
      nano_cpus: 2000000000
      mem_reservation: 4g
      mem_swappiness: 0
      memswap_limit: 16g
      device_read_bps: [{Path: /dev/sda, Rate: 1048576}]
      device_read_iops: [{Path: /dev/sda, Rate: 100}]
      device_write_bps: [{Path: /dev/sda, Rate: 2097152}]
      device_write_iops: [{Path: /dev/sda, Rate: 200}]
    gpu: False
    input_mounts:
      src: /input
    output_mounts:
      first: /output
    static_mounts:
      - "AwesomeModel1:/model1"
      - "AwesomeModel2:/model2"
    config:
      fold: all
      folds: [0, 1, 2]
    config_path: /config/settings.yaml
  - docker_kwargs:
      image: registry.local/hn-post@sha256:0123abcd
      command: ["python", "/app/post.py", 3]
      entrypoint: /bin/sh
    gpu: True
    input_mounts:
      first: /input
    output_mounts:
      dst: /output
    pull_before_exec: True
    timeout: 1800
    static_mounts: "AwesomeModel1:/model"
destinations:
  - host: localhost
    port: 10001
    ae_title: STORESCP
  - host: storage.some-system.org
    port: 104
    ae_title: FANCYSTORE
"""


def test_raddeploy_form_with_every_field(tmp_path: Path) -> None:
    path = write(tmp_path, RADDEPLOY_FULL, "fancy.yaml")
    flow = load_flow(path)

    assert comparable(flow) == Flow(
        name="FancyFlow",
        dag_id="fancyflow",
        source=path,
        version="1.02",
        priority=4,
        triggers=(
            trigger(("Modality", ["CT"]), ("SeriesDescription", ["Head|Neck|Brain"]), match=SEARCH),
            trigger(("SOPClassUID", ["1.2.840.10008.5.1.4.1.1.4"]),
                    ("StudyDescription", ["(?i)AutoSegProtocol", "~FLAIR"]), match=SEARCH),
        ),
        input=InputSpec(layout=("SOPClassUID", "SeriesInstanceUID"), whole_series=True),
        return_to_sender=(104, 11112),
        extra={"INTERESTING_PARAMETER": "FooBar", "USED_FOR_CUSTOM_SERVICE": 3},
        grouping=Grouping(),
        models=(
            ModelSpec(
                name="model_0",
                image="registry.local/hn-seg:2.1",
                command="sh -c 'echo $CONTAINER_ORDER; cp -r /input/* /output/'",
                environment={"CONTAINER_ORDER": "0", "MODE": "fast"},  # numbers become text
                mem_limit=8 * GiB,
                shm_size=2 * GiB,
                user="1000:1000",
                working_dir="/app",
                labels={"team": "physics"},
                network="bridge",  # network_disabled: false
                ipc_mode="shareable",
                gpu=0,
                inputs={"src": "/input"},
                outputs={"first": "/output"},
                static_mounts={"AwesomeModel1": "/model1", "AwesomeModel2": "/model2"},
                config={"fold": "all", "folds": [0, 1, 2]},
                config_path="/config/settings.yaml",
                pull="missing",
                host_config={  # the CPU and IO limits, passed to Docker as given (sizes in bytes)
                    "cpu_shares": 512, "cpu_period": 100000, "cpu_quota": 200000,
                    "cpu_rt_period": 1000000, "cpu_rt_runtime": 950000, "cpuset_cpus": "0-3",
                    "nano_cpus": 2000000000, "mem_reservation": 4 * GiB, "mem_swappiness": 0,
                    "memswap_limit": 16 * GiB,
                    "device_read_bps": [{"Path": "/dev/sda", "Rate": 1048576}],
                    "device_read_iops": [{"Path": "/dev/sda", "Rate": 100}],
                    "device_write_bps": [{"Path": "/dev/sda", "Rate": 2097152}],
                    "device_write_iops": [{"Path": "/dev/sda", "Rate": 200}],
                },
            ),
            ModelSpec(
                name="model_1",
                image="registry.local/hn-post@sha256:0123abcd",
                command=("python", "/app/post.py", "3"),
                entrypoint="/bin/sh",
                gpu=1,  # True means one GPU
                inputs={"first": "/input"},
                outputs={"dst": "/output"},
                pull="always",  # pull_before_exec: True
                timeout=1800.0,  # seconds
                static_mounts={"AwesomeModel1": "/model"},  # the single-string form
            ),
        ),
        destinations=(
            Destination(host="localhost", port=10001, ae_title="STORESCP"),
            Destination(host="storage.some-system.org", port=104, ae_title="FANCYSTORE"),
        ),
        spelling="raddeploy",
    )
    # network_disabled: false is legal but reaches the network: the warning points at that line;
    # RadDeploy's "CT" also matches RTSTRUCT: said, with the anchored pattern
    assert [str(w) for w in flow.warnings] == [
        overlap(path, 8, "triggers[0].Modality", "CT", CT_TERMS, "^CT$"),
        f"{path}:30: models[0].network: model 'model_0' can reach the network ({NETWORK})",
    ]


def test_raddeploy_readme_simplest_flow(tmp_path: Path) -> None:
    """The README's first flow: no name (the file stem is used), a scalar trigger, no destinations."""
    path = write(tmp_path, """
        triggers:
          - Modality: CT
        models:
          - docker_kwargs:
              image: hello-world
        destinations: []
    """, "Hello World.yml")
    flow = load_flow(path)
    assert comparable(flow) == Flow(
        name="Hello World", dag_id="hello_world", source=path,
        triggers=(trigger(("Modality", ["CT"]), match=SEARCH),),
        # RadDeploy's default mounts: the matched DICOM in /input, /output sent
        models=(ModelSpec(name="model_0", image="hello-world", inputs={"src": "/input"}, outputs={"dst": "/output"}),),
        destinations=(), spelling="raddeploy",
    )
    assert [str(w) for w in flow.warnings] == [
        overlap(path, 2, "triggers[0].Modality", "CT", CT_TERMS, "^CT$"),
        f"{path}:5: models[0].image: image 'hello-world' has a mutable tag ({MUTABLE})",
    ]


def test_raddeploy_readme_variants(tmp_path: Path) -> None:
    """Spellings from RadDeploy's README: scalar values, one port, int environment, a string mount."""
    flow = load_flow(write(tmp_path, """
        name: variants
        triggers:
          - Modality: CT
            SeriesDescription: "Head|Neck|Brain"
        return_to_sender_on_port: 104
        models:
          - docker_kwargs:
              image: busybox:1.36
              command: sh -c 'echo $CONTAINER_ORDER'
              environment:
                CONTAINER_ORDER: 1
                SCALE: 0.5
            static_mounts: "AwesomeModel1:/model"
            input_mounts: {src: /input}
            output_mounts: {dst: /output}
            timeout: 90
    """))
    assert flow.triggers == (trigger(("Modality", ["CT"]), ("SeriesDescription", ["Head|Neck|Brain"]), match=SEARCH),)
    assert flow.return_to_sender == (104,)
    (model,) = flow.models
    assert model.environment == {"CONTAINER_ORDER": "1", "SCALE": "0.5"}
    assert model.static_mounts == {"AwesomeModel1": "/model"}
    assert model.timeout == 90.0
    assert [str(w) for w in flow.warnings] == [overlap(flow.source, 3, "triggers[0].Modality", "CT", CT_TERMS, "^CT$")]


def test_every_return_to_sender_spelling_adds_up_without_repeats(tmp_path: Path) -> None:
    flow = load_flow(write(tmp_path, """
        name: ports
        triggers: [{Modality: CT}]
        return_to_sender: [104]
        return_to_sender_on_ports: [104, 11112]
        return_to_sender_on_port: 4242
        models: [{image: "a:1", outputs: {dst: /out}}]
    """))
    assert flow.return_to_sender == (104, 11112, 4242)


#: RadDeploy's five-fold ensemble, its merge mounting two static folders (the merge's inputs one a line).
ENSEMBLE = ensemble_flow(merge={
    "command": "sh -c 'cp /input*/* /output/; ls -la /output; sleep 10'", "pull_before_exec": True, "timeout": 1800,
    "static_mounts": ["AwesomeModel1:/model1", "AwesomeModel2:/model2"]})


def test_raddeploy_five_fold_ensemble(tmp_path: Path) -> None:
    flow = load_flow(write(tmp_path, ENSEMBLE))
    folds = [ModelSpec(name=f"model_{i}", image="busybox:1.36", command=f"sh -c 'touch /output/SEG_{i}'",
                       inputs={"src": "/input"}, outputs={f"seg{i}": "/output"}) for i in range(5)]
    merge = ModelSpec(
        name="model_5", image="busybox:1.36", command="sh -c 'cp /input*/* /output/; ls -la /output; sleep 10'",
        inputs={f"seg{i}": f"/input{i}" for i in range(5)}, outputs={"dst": "/output"}, pull="always",
        timeout=1800.0, static_mounts={"AwesomeModel1": "/model1", "AwesomeModel2": "/model2"},
    )
    assert flow.models == (*folds, merge)
    assert flow.destinations == (Destination(host="localhost", port=10001, ae_title="STORESCP"),)


#: RadDeploy's own scheduler test flow ``dag_flow.yaml``: a diamond with a skip edge (CT).
DAG_FLOW = """
name: "dag_flow.yaml"
triggers:
  - Modality: ["MR"]
return_to_sender_on_port: [10002]

models:
  - docker_kwargs:
      image: busybox:1.36
      command: sh -c 'echo $HEST; cd /input; cp -r * /output/'
    input_mounts:
      src: /input
    output_mounts:
      CT: /output1
      STRUCT: /output2

  - docker_kwargs:
      image: busybox:1.36
      command: sh -c 'echo $HEST; cd /input; cp -r * /output/'
    input_mounts:
      STRUCT: /input
    output_mounts:
      STRUCT_POSTPROCESS1: /output
    gpu: True

  - docker_kwargs:
      image: busybox:1.36
      command: sh -c 'echo $HEST; cd /input; cp -r * /output/'
    input_mounts:
      STRUCT: /input
    output_mounts:
      STRUCT_POSTPROCESS: /output

  - docker_kwargs:
      image: busybox:1.36
      command: sh -c 'echo $HEST; cd /input; cp -r * /output/;'
    input_mounts:
      STRUCT_POSTPROCESS: /struct
      STRUCT_POSTPROCESS1: /struct1
      CT: /ct
    output_mounts:
      dst: /output


destinations: []

priority: 1
"""


def test_raddeploy_dag_flow_diamond(tmp_path: Path) -> None:
    flow = load_flow(write(tmp_path, DAG_FLOW))
    assert (flow.name, flow.dag_id, flow.priority) == ("dag_flow.yaml", "dag_flow.yaml", 1)
    assert flow.return_to_sender == (10002,)
    assert flow.destinations == ()
    assert [(m.name, m.inputs, m.outputs, m.gpu) for m in flow.models] == [
        ("model_0", {"src": "/input"}, {"CT": "/output1", "STRUCT": "/output2"}, 0),
        ("model_1", {"STRUCT": "/input"}, {"STRUCT_POSTPROCESS1": "/output"}, 1),
        ("model_2", {"STRUCT": "/input"}, {"STRUCT_POSTPROCESS": "/output"}, 0),
        ("model_3", {"STRUCT_POSTPROCESS": "/struct", "STRUCT_POSTPROCESS1": "/struct1", "CT": "/ct"},
         {"dst": "/output"}, 0),
    ]


def test_old_chained_form_with_input_dir_and_output_dir(tmp_path: Path) -> None:
    """Models without mounts run one after the other: src -> chain_0 -> chain_1 -> dst."""
    flow = load_flow(write(tmp_path, """
        name: chained
        triggers: [{Modality: CT}]
        models:
          - docker_kwargs: {image: "reg:1"}
            input_dir: /input/
            output_dir: /output/
          - docker_kwargs: {image: "seg:1"}
            input_dir: /data/in
          - docker_kwargs: {image: "post:1"}
            output_dir: /data/out
        destinations: [{host: h, port: 104, ae_title: A}]
    """))
    assert [(m.inputs, m.outputs) for m in flow.models] == [
        ({"src": "/input/"}, {"chain_0": "/output/"}),
        ({"chain_0": "/data/in"}, {"chain_1": "/output"}),  # the defaults where a dir is left out
        ({"chain_1": "/input"}, {"dst": "/data/out"}),
    ]


def test_chained_form_with_one_model(tmp_path: Path) -> None:
    flow = load_flow(write(tmp_path, """
        name: one
        triggers: [{Modality: CT}]
        models:
          - {image: "seg:1", input_dir: /in, output_dir: /out}
    """))
    assert (flow.models[0].inputs, flow.models[0].outputs) == ({"src": "/in"}, {"dst": "/out"})


def test_empty_mounts_are_no_mounts(tmp_path: Path) -> None:
    # regression: `inputs: {}` used to crash the loader with KeyError('input_mounts')
    flow = load_flow(write(tmp_path, """
        name: empty
        triggers: [{Modality: CT}]
        models:
          - {image: "a:1", inputs: {}, outputs: {}}
          - {image: "b:1", input_mounts: {}, output_mounts: {dst: /out}}
    """))
    assert [(m.inputs, m.outputs) for m in flow.models] == [({}, {}), ({}, {"dst": "/out"})]


# -- native spelling: every field --------------------------------------------------------------

NATIVE_FULL = """
name: HN CT OARs
id: hn.ct-oars_v2
version: "1.1"
description: Head and neck organs at risk on the planning CT
priority: 3
tags: [hn, oar]
triggers:
  - Modality: CT
    SeriesDescription: ["(?i)head|neck", "~(?i)scout"]
grouping:
  quiet_period: 90
  timeout: 2h
  on_timeout: fail
input:
  layout: flat
  whole_series: false
models:
  - name: register
    image: registry.local/hn-reg:1.0
    entrypoint: ["/bin/sh", "-c"]
    command: python /app/run.py --fast
    environment: {THREADS: "4"}
    inputs: {src: /input}
    outputs: {ct_reg: /output}
    timeout: 30m
    retries: 2
    mem_limit: 512m
    shm_size: 1073741824
    user: "1000:1000"
    pull: never
  - name: segment
    image: registry.local/hn-seg:1.1
    gpu: 2
    inputs: {ct_reg: /input, src: /dicom}
    outputs: {dst: /output, dst_rtstruct: /rt}
    static_mounts: {hn_weights: /model, atlas.v2: /atlas}
    config: {fold: all, threshold: 0.5}
    config_path: /config/settings.yaml
    timeout: 90s
    mem_limit: 24g
    shm_size: 8g
    network: bridge
    pull: always
destinations:
  - connection: tps_eclipse
  - connection: aria
    calling_ae_title: RADDEPLOY2
  - {host: 10.0.0.5, port: 104, ae_title: ARIA, calling_ae_title: RADDEPLOY}
return_to_sender: [104]
extra: {site: aarhus}
"""


def test_native_form_with_every_field(tmp_path: Path) -> None:
    path = write(tmp_path, NATIVE_FULL)
    flow = load_flow(path)
    assert comparable(flow) == Flow(
        name="HN CT OARs",
        dag_id="hn.ct-oars_v2",
        source=path,
        version="1.1",
        description="Head and neck organs at risk on the planning CT",
        priority=3,
        tags=("hn", "oar"),
        triggers=(trigger(("Modality", ["CT"]), ("SeriesDescription", ["(?i)head|neck", "~(?i)scout"])),),
        grouping=Grouping(quiet_period=90.0, timeout=7200.0, on_timeout="fail"),
        input=InputSpec(layout=(), whole_series=False),
        models=(
            ModelSpec(
                name="register", image="registry.local/hn-reg:1.0", entrypoint=("/bin/sh", "-c"),
                command="python /app/run.py --fast", environment={"THREADS": "4"}, inputs={"src": "/input"},
                outputs={"ct_reg": "/output"}, timeout=1800.0, retries=2, mem_limit=512 * MiB,
                shm_size=GiB, user="1000:1000", pull="never",
            ),
            ModelSpec(
                name="segment", image="registry.local/hn-seg:1.1", gpu=2,
                inputs={"ct_reg": "/input", "src": "/dicom"}, outputs={"dst": "/output", "dst_rtstruct": "/rt"},
                static_mounts={"hn_weights": "/model", "atlas.v2": "/atlas"},
                config={"fold": "all", "threshold": 0.5}, config_path="/config/settings.yaml", timeout=90.0,
                mem_limit=24 * GiB, shm_size=8 * GiB, network="bridge", pull="always",
            ),
        ),
        destinations=(
            Destination(connection="tps_eclipse"),
            Destination(connection="aria", calling_ae_title="RADDEPLOY2"),
            Destination(host="10.0.0.5", port=104, ae_title="ARIA", calling_ae_title="RADDEPLOY"),
        ),
        return_to_sender=(104,),
        extra={"site": "aarhus"},
    )
    assert [str(w) for w in flow.warnings] == [
        f"{path}:42: models[1].network: model 'segment' can reach the network ({NETWORK})",
    ]


@pytest.mark.parametrize("written, size", [
    ("512m", 512 * MiB), ("24g", 24 * GiB), ("24G", 24 * GiB), ("1.5g", int(1.5 * GiB)), ("512MiB", 512 * MiB),
    ("2gb", 2 * GiB), ("64k", 64 * 1024), ("1t", 1024**4), ("1048576", 1048576), ("4096", 4096),
])
def test_sizes(tmp_path: Path, written: str, size: int) -> None:
    flow = load_flow(write(tmp_path, f"""
        name: sizes
        triggers: [{{Modality: CT}}]
        models:
          - image: "a:1"
            mem_limit: {written}
            shm_size: "{written}"
          - docker_kwargs: {{image: "b:1", mem_limit: {written}, mem_reservation: {written}}}
    """))
    first, second = flow.models
    assert (first.mem_limit, first.shm_size, second.mem_limit) == (size, size, size)
    assert second.host_config == {"mem_reservation": size}


# -- errors --------------------------------------------------------------------------------------

HEAD = "name: x\ntriggers: [{Modality: ^CT$}]\n"  # lines 1-2 of every flow below (anchored: no overlap warning)


@pytest.mark.parametrize("body, expected", [
    # unknown keys, with did-you-mean, in every section
    ("return_to_sender_on_prot: [104]\nmodels: [{image: 'a:1'}]\n",
     "F:3: return_to_sender_on_prot: unknown key (did you mean `return_to_sender_on_port`?)"),
    ("grouping: {quiet_perod: 5s}\nmodels: [{image: 'a:1'}]\n",
     "F:3: grouping.quiet_perod: unknown key (did you mean `quiet_period`?)"),
    ("input: {whole_serie: true}\nmodels: [{image: 'a:1'}]\n",
     "F:3: input.whole_serie: unknown key (did you mean `whole_series`?)"),
    ("models:\n  - image: 'a:1'\n    input_mount: {src: /in}\n",
     "F:5: models[0].input_mount: unknown key (did you mean `input_mounts`?)"),
    ("models:\n  - docker_kwargs:\n      image: 'a:1'\n      shm_sise: 2g\n",
     "F:6: models[0].docker_kwargs.shm_sise: unknown key (did you mean `shm_size`?)"),
    ("models: [{image: 'a:1'}]\ndestinations:\n  - conection: tps\n",
     "F:5: destinations[0].conection: unknown key (did you mean `connection`?)"),
    # choices and values
    ("models:\n  - image: 'a:1'\n    network: host\n",
     "F:5: models[0].network: unknown network 'host' (use none (the default) or bridge; "
     "the host's network is never given)"),
    ("models:\n  - image: 'a:1'\n    pull: sometimes\n",
     "F:5: models[0].pull: unknown choice 'sometimes' (use one of always, missing, never)"),
    ("grouping: {on_timeout: wait}\nmodels: [{image: 'a:1'}]\n",
     "F:3: grouping.on_timeout: unknown choice 'wait' (use one of skip, fail, proceed)"),
    ("models:\n  - docker_kwargs: {image: 'a:1', ipc_mode: host}\n",
     "F:4: models[0].docker_kwargs.ipc_mode: unknown choice 'host' (use one of private, shareable)"),
    ("models:\n  - image: 'a:1'\n    mem_limit: lots\n",
     "F:5: models[0].mem_limit: not a size: 'lots' (write bytes or a number with k, m or g (512m, 24g))"),
    ("models:\n  - image: 'a:1'\n    shm_size: 0\n",
     "F:5: models[0].shm_size: not a size: '0' (write bytes or a number with k, m or g (512m, 24g))"),
    ("models:\n  - docker_kwargs: {image: 'a:1', memswap_limit: -1g}\n",
     "F:4: models[0].docker_kwargs.memswap_limit: not a size: '-1g' "
     "(write bytes or a number with k, m or g (512m, 24g))"),
    ("models:\n  - docker_kwargs: {image: 'a:1', cpu_shares: 0.5}\n",
     "F:4: models[0].docker_kwargs.cpu_shares: not a whole number >= 0: 0.5"),
    ("models:\n  - image: 'a:1'\n    retries: -1\n", "F:5: models[0].retries: not a whole number >= 0: -1"),
    ("models:\n  - docker_kwargs: {image: 'a:1', network_disabled: 'no'}\n",
     "F:4: models[0].docker_kwargs.network_disabled: not true or false: 'no'"),
    ("priority: 5\nmodels: [{image: 'a:1'}]\n", "F:3: priority: not a priority from 0 to 4: 5"),
    ("priority: -1\nmodels: [{image: 'a:1'}]\n", "F:3: priority: not a priority from 0 to 4: -1"),
    ("priority: high\nmodels: [{image: 'a:1'}]\n", "F:3: priority: not a priority from 0 to 4: 'high'"),
    ("return_to_sender_on_ports: [104, 0]\nmodels: [{image: 'a:1'}]\n",
     "F:3: return_to_sender_on_ports: not a TCP port: 0"),
    ("tar_subdir: [SOPClasUID, SeriesInstanceUID]\nmodels: [{image: 'a:1'}]\n",
     "F:3: tar_subdir: unknown DICOM keyword 'SOPClasUID' (did you mean `SOPClassUID`?)"),
    ("tar_subdir: [Modality]\ninput: {layout: [Modality]}\nmodels: [{image: 'a:1'}]\n",
     "F:3: tar_subdir: given with `input.layout` (keep one)"),
    ("extra: [a, b]\nmodels: [{image: 'a:1'}]\n", "F:3: extra: must be a mapping of key: value"),
    # RadDeploy forms that cannot work
    ("models:\n  - docker_kwargs: {image: 'a:1'}\n    input_dir: /input\n"
     "  - docker_kwargs: {image: 'b:1'}\n    input_mounts: {src: /input}\n",
     "F:6: models[1]: mixes mounts with the chained `input_dir`/`output_dir` form "
     "(use input_mounts/output_mounts in every model, or in none)"),
    ("models:\n  - docker_kwargs: {image: 'a:1'}\n    static_mounts: AwesomeModel1\n",
     "F:5: models[0].static_mounts: 'AwesomeModel1' is not `name:/path` "
     "(one colon between the asset name and the path in the container)"),
    ("models:\n  - docker_kwargs: {image: 'a:1'}\n    static_mounts: ['AwesomeModel1:/model:ro']\n",
     "F:5: models[0].static_mounts: 'AwesomeModel1:/model:ro' is not `name:/path` "
     "(one colon between the asset name and the path in the container)"),
    ("models:\n  - docker_kwargs: {image: 'a:1'}\n    static_mounts: ['../secrets:/model']\n",
     "F:5: models[0].static_mounts: '../secrets' cannot name an asset folder (use letters, digits, '_', '.' and '-')"),
    ("models:\n  - docker_kwargs: {image: 'a:1'}\n    static_mounts: ['weights:model']\n",
     "F:5: models[0].static_mounts: 'model' is not an absolute path in the container"),
    ("models:\n  - docker_kwargs: {image: 'a:1'}\n    input_mounts:\n      src: input/\n",
     "F:6: models[0].input_mounts.src: 'input/' is not an absolute path in the container "
     "(write it from the root, e.g. /input)"),
    ("models:\n  - image: 'a:1'\n    outputs: {dst: output}\n",
     "F:5: models[0].outputs.dst: 'output' is not an absolute path in the container "
     "(write it from the root, e.g. /input)"),
    ("models:\n  - image: 'a:1'\n    pull: missing\n    pull_before_exec: true\n",
     "F:5: models[0].pull: contradicts pull_before_exec (keep one)"),
    ("models:\n  - docker_kwargs: {command: ls}\n",
     "F:4: models[0].image: missing (name the Docker image the model runs)"),
    ("models:\n  - image: 'a:1'\n    timeout: 0\n",
     "F:5: models[0].timeout: a timeout must be longer than 0 (leave it out for no timeout)"),
    ("models:\n  - image: 'a:1'\n    config_path: config.yaml\n",
     "F:5: models[0].config_path: 'config.yaml' is not an absolute path in the container "
     "(write it from the root, e.g. /config/config.yaml)"),
    ("models:\n  - image: 'a:1'\n    network: none\n    docker_kwargs: {network_disabled: false}\n",
     "F:5: models[0].network: contradicts docker_kwargs.network_disabled (keep one)"),
    ("models:\n  - command: ls\n    docker_kwargs: {image: 'a:1', command: ls}\n",
     "F:4: models[0].command: given both here and in docker_kwargs (keep one)"),
    ("models: [{image: 'a:1'}]\ndestinations:\n  - {connection: tps, host: h}\n",
     "F:5: destinations[0].host: given with `connection` "
     "(the connection holds host, port and AE title; keep one form)"),
    ("models: [{image: 'a:1'}]\ndestinations:\n  - {host: h, port: 104, ae_title: WAY_TOO_LONG_AE_TITLE}\n",
     "F:5: destinations[0].ae_title: 'WAY_TOO_LONG_AE_TITLE' is not an AE title "
     "(use at most 16 characters, no backslash)"),
])
def test_errors(tmp_path: Path, body: str, expected: str) -> None:
    assert error_of(tmp_path, HEAD + body) == expected


@pytest.mark.parametrize("name", [".", "..", "input", "config", "sent"])
def test_mount_names_the_run_folder_uses_are_reserved(tmp_path: Path, name: str) -> None:
    # regression: an output named '..' was emptied with rmtree before the model ran: the DAG's
    # other runs; 'input' was the matched DICOM, 'config' and 'sent' the run's own files
    assert error_of(tmp_path, HEAD + f"""models:
  - {{name: a, image: 'a:1', inputs: {{src: /in}}, outputs: {{'{name}': /out}}}}
  - {{name: b, image: 'b:1', inputs: {{'{name}': /in}}, outputs: {{dst: /out}}}}
""") == (f"F:4: models[0].outputs.{name}: mount name {name!r} is reserved "
         "(the run folder uses it itself; pick another name (the matched DICOM is `src`))")


@pytest.mark.parametrize("key, hint", [
    ("privileged: true", "models run unprivileged; ask for GPUs with `gpu:`"),
    ("cap_add: [SYS_ADMIN]", "models run with no added capabilities"),
    ("volumes: ['/data:/data']", "use `inputs`, `outputs` and `static_mounts`"),
    ("network_mode: host", "use `network: bridge` (or `network_disabled: false`) when a model must call out"),
    ("ports: {'8080/tcp': 8080}", "models do not listen; they read their inputs and write their outputs"),
    ("devices: ['/dev/nvidia0:/dev/nvidia0']", "ask for GPUs with `gpu:`; other devices are not given to models"),
])
def test_refused_docker_kwargs(tmp_path: Path, key: str, hint: str) -> None:
    text = HEAD + f"models:\n  - docker_kwargs:\n      image: 'a:1'\n      {key}\n"
    name = key.partition(":")[0]
    assert error_of(tmp_path, text) == f"F:6: models[0].docker_kwargs.{name}: not allowed ({hint})"


def test_every_refused_docker_kwarg_is_refused_with_its_reason(tmp_path: Path) -> None:
    assert not set(DOCKER_KWARGS_REFUSED) & {k.name for k in SECTIONS["docker_kwargs"]}
    for name, hint in DOCKER_KWARGS_REFUSED.items():
        text = HEAD + f"models:\n  - docker_kwargs: {{image: 'a:1', {name}: x}}\n"
        assert error_of(tmp_path, text) == f"F:4: models[0].docker_kwargs.{name}: not allowed ({hint})"


def test_unknown_dicom_keyword(tmp_path: Path) -> None:
    assert error_of(tmp_path, """
        name: x
        triggers:
          - Modality: CT
          - Modalty: MR
            SeriesDescription: t1
        models: [{image: 'a:1'}]
    """) == "F:4: triggers[1].Modalty: unknown DICOM keyword 'Modalty' (did you mean `Modality`?)"
    assert error_of(tmp_path, """
        name: x
        triggers:
          - NotATagAtAll: CT
        models: [{image: 'a:1'}]
    """) == ("F:3: triggers[0].NotATagAtAll: unknown DICOM keyword 'NotATagAtAll' "
             "(use a keyword of the DICOM dictionary, e.g. SeriesDescription)")


def test_bad_regex_in_a_scalar_exclusion(tmp_path: Path) -> None:
    with pytest.raises(re.error) as compiled:
        re.compile("[scout")
    assert error_of(tmp_path, """
        name: x
        triggers:
          - Modality: CT
            SeriesDescription: "~[scout"
        models: [{image: 'a:1'}]
    """) == (f"F:4: triggers[0].SeriesDescription: bad regex '[scout': {compiled.value} "
             "(fix the regular expression (quote it if it holds ':' or '#'))")


def test_cycle_in_raddeploy_spelling(tmp_path: Path) -> None:
    assert error_of(tmp_path, """
        name: x
        triggers: [{Modality: CT}]
        models:
          - docker_kwargs: {image: 'a:1'}
            input_mounts: {src: /input}
            output_mounts: {CT: /output}
          - docker_kwargs: {image: 'b:1'}
            input_mounts:
              CT: /ct
              STRUCT_POSTPROCESS: /post
            output_mounts: {STRUCT: /output}
          - docker_kwargs: {image: 'c:1'}
            input_mounts: {STRUCT: /input}
            output_mounts: {STRUCT_POSTPROCESS: /output, dst: /dst}
    """) == ("F:10: models[1].input_mounts: the models form a cycle: model_1 -> model_2 -> model_1 "
             "(a model cannot read, directly or not, what it writes)")


def test_input_nobody_produces_in_the_diamond(tmp_path: Path) -> None:
    text = DAG_FLOW.replace("      STRUCT_POSTPROCESS: /struct\n", "      STRUCT_POSTPROCES: /struct\n")
    assert error_of(tmp_path, text) == (
        "F:37: models[3].input_mounts: model 'model_3' reads 'STRUCT_POSTPROCES', which no model writes "
        "(use 'src' for the matched DICOM or an output name of another model)")


def test_output_never_used_is_an_error(tmp_path: Path) -> None:
    assert error_of(tmp_path, """
        name: x
        triggers: [{Modality: CT}]
        models:
          - name: seg
            image: 'a:1'
            inputs: {src: /input}
            outputs:
              dst: /output
              masks: /masks
    """) == ("F:9: models[0].outputs: output 'masks' of model 'seg' is never used "
             "(read it in another model's inputs, or name it dst* to send it)")


def test_output_never_used_in_raddeploy_spelling_is_a_warning(tmp_path: Path) -> None:
    """RadDeploy discarded outputs nobody read, so its flows load: with a warning at the output."""
    path = write(tmp_path, ENSEMBLE.replace("      seg4: /input4\n", ""))  # merge reads four folds
    flow = load_flow(path)
    assert [m.name for m in flow.models] == [f"model_{i}" for i in range(6)]
    assert [str(w) for w in flow.warnings] == [
        overlap(path, 3, "triggers[0].Modality", "CT", CT_TERMS, "^CT$"),
        f"{path}:44: models[4].output_mounts: output 'seg4' of model 'model_4' is never used "
        "(read it in another model's inputs, or name it dst* to send it)",
    ]


def test_duplicate_dag_ids_of_unnamed_flows_in_two_folders(tmp_path: Path) -> None:
    """RadDeploy flows need no name: two `flow.yaml` in two folders get the same DAG id."""
    readme_flow = "triggers:\n  - Modality: CT\nmodels:\n  - docker_kwargs: {image: 'a:1'}\n"
    first = write(tmp_path, readme_flow, "hn/flow.yaml")
    second = write(tmp_path, readme_flow, "lung/flow.yaml")
    other = write(tmp_path, readme_flow, "lung/flow2.yml")

    result = load_flows(tmp_path)

    assert [(f.dag_id, f.source) for f in result.flows] == [("flow", first), ("flow2", other)]
    # neither `id:` nor `name:` gives the id: there is no line to point at
    assert [str(e) for e in result.errors] == [
        f"{second}: id: DAG id 'flow' is already used by {first} (give one of the flows another `id`)",
    ]


# -- warnings ------------------------------------------------------------------------------------

@pytest.mark.parametrize("image, warned", [
    ("busybox", True), ("busybox:latest", True), ("registry.local:5000/hn-seg", True),
    ("registry.local:5000/hn-seg:latest", True),
    ("busybox:1.2", False), ("registry.local:5000/hn-seg:1.2", False),
    ("busybox@sha256:0123abcd", False), ("registry.local/hn-seg:latest@sha256:0123abcd", False),
])
def test_mutable_image_tag_warning(tmp_path: Path, image: str, warned: bool) -> None:
    native = write(tmp_path, HEAD + f"models:\n  - image: '{image}'\n", "native.yaml")
    raddeploy = write(tmp_path, HEAD + f"models:\n  - docker_kwargs:\n      image: '{image}'\n", "raddeploy.yaml")
    for path, line in ((native, 4), (raddeploy, 5)):
        flow = load_flow(path)
        expected = [f"{path}:{line}: models[0].image: image {image!r} has a mutable tag ({MUTABLE})"]
        assert [str(w) for w in flow.warnings] == (expected if warned else [])


def test_network_warning_in_both_spellings(tmp_path: Path) -> None:
    path = write(tmp_path, HEAD + """models:
  - name: fetch
    image: 'a:1'
    network: bridge
  - name: none
    image: 'b:1'
    network: none
  - docker_kwargs:
      image: 'c:1'
      network_disabled: false
    output_mounts: {dst_c: /output}
  - docker_kwargs:
      image: 'd:1'
      network_disabled: true
    output_mounts: {dst_d: /output}
""")
    flow = load_flow(path)
    assert [m.network for m in flow.models] == ["bridge", "none", "bridge", "none"]
    assert [str(w) for w in flow.warnings] == [
        f"{path}:6: models[0].network: model 'fetch' can reach the network ({NETWORK})",
        f"{path}:12: models[2].network: model 'model_2' can reach the network ({NETWORK})",
    ]


def test_load_flows_collects_the_warnings_of_the_flows_it_loads(tmp_path: Path) -> None:
    first = write(tmp_path, HEAD + "models:\n  - image: busybox\n  - {image: 'b:1', network: bridge}\n", "a.yaml")
    write(tmp_path, HEAD.replace("x", "pinned") + "models: [{image: 'b:1'}]\n", "b.yaml")
    write(tmp_path, HEAD + "models: [{image: busybox}]\n", "c.yaml")  # id 'x' again: not loaded
    write(tmp_path, "name: broken\ntriggers: [{Modalty: CT}]\nmodels: [{image: busybox}]\n", "d.yaml")
    last = write(tmp_path, "triggers: [{Modality: MR}]\nmodels:\n  - docker_kwargs: {image: 'e:latest'}\n",
                 "e.yaml")

    result = load_flows(tmp_path)

    assert [f.dag_id for f in result.flows] == ["x", "pinned", "e"]
    assert len(result.errors) == 2
    assert [str(w) for w in result.warnings] == [
        f"{first}:4: models[0].image: image 'busybox' has a mutable tag ({MUTABLE})",
        f"{first}:5: models[1].network: model 'model_1' can reach the network ({NETWORK})",
        overlap(last, 1, "triggers[0].Modality", "MR", "Modality MR, SMR", "^MR$"),
        f"{last}:3: models[0].image: image 'e:latest' has a mutable tag ({MUTABLE})",
    ]
    assert result.warnings == [w for f in result.flows for w in f.warnings]


# -- the schema's examples are real ---------------------------------------------------------------

#: Keys with no example in the docs. None: every key has one that loads.
KEYS_WITHOUT_EXAMPLE: set[tuple[str, str]] = set()

#: Keys whose example is the default value, so loading it changes nothing.
EXAMPLE_IS_THE_DEFAULT = {("flow", "input"), ("docker_kwargs", "network_disabled")}

ALL_KEYS = [(section, key) for section, keys in SECTIONS.items() for key in keys]
#: Flow keys that mean something only with `review: required`.
REVIEW_SETTINGS = ("reviewers", "review_timeout", "on_review_timeout")


def test_every_key_has_an_example() -> None:
    assert {(section, key.name) for section, key in ALL_KEYS if not key.example} == KEYS_WITHOUT_EXAMPLE


def example_flow(section: str, key: Key) -> str:
    """A minimal valid flow that sets ``key`` of ``section`` to its example, as docs/flows.md writes it."""
    line = f"{key.name}: {key.example}"
    top = {"name": "name: example", "triggers": "triggers: [{Modality: CT}]",
           "models": "models:\n  - image: 'img:1'"}
    if section in ("flow", "destinations[]"):  # results that go somewhere need a dst output
        top["models"] += "\n    outputs: {dst: /output}"
    if section == "flow":
        if key.name in REVIEW_SETTINGS:  # they need a review to set
            top["review"] = "review: required"
        top[key.name] = line
    elif section in ("grouping", "input", "notify"):
        top[section] = f"{section}:\n  {line}"
    elif section == "models[]":
        base = [] if key.name in ("image", "docker_kwargs") else ["image: 'img:1'"]
        top["models"] = "models:\n  - " + "\n    ".join([*base, line])
    elif section == "docker_kwargs":
        base = [] if key.name == "image" else ["image: 'img:1'"]
        top["models"] = "models:\n  - docker_kwargs:\n      " + "\n      ".join([*base, line])
    elif section == "destinations[]":
        node = {} if key.name == "connection" else {"host": "h", "port": "104", "ae_title": "A"}
        node[key.name] = key.example
        top["destinations"] = "destinations:\n  - " + "\n    ".join(f"{k}: {v}" for k, v in node.items())
    else:
        raise AssertionError(f"no place for section {section!r}")
    return "\n".join(top.values()) + "\n"


@pytest.mark.parametrize("section, key", [pytest.param(s, k, id=f"{s}.{k.name}") for s, k in ALL_KEYS if k.example])
def test_every_example_loads(tmp_path: Path, section: str, key: Key) -> None:
    flow = load_flow(write(tmp_path, example_flow(section, key), "example.yaml"))
    base_text = example_flow("flow", Key("name", "text", "", example="example"))
    if section not in ("flow", "destinations[]"):  # compare like with like: no dst output there
        base_text = base_text.replace("\n    outputs: {dst: /output}", "")
    if section == "docker_kwargs":  # like with like: a RadDeploy model (its spelling, its default mounts)
        base_text = example_flow(section, Key("image", "text", "", example="'img:1'"))
    if key.name in REVIEW_SETTINGS and section == "flow":  # like with like: a flow with a review
        base_text = example_flow("flow", Key("review", "choice", "", example="required"))
    base = load_flow(write(tmp_path, base_text, "base.yaml"))
    changed = comparable(dataclasses.replace(flow, source=base.source)) != comparable(base)
    assert changed == ((section, key.name) not in EXAMPLE_IS_THE_DEFAULT), "the example should show a change"


def test_example_flow_places_keys_where_they_belong() -> None:
    assert example_flow("docker_kwargs", SECTIONS["docker_kwargs"][4]) == (
        "name: example\ntriggers: [{Modality: CT}]\nmodels:\n  - docker_kwargs:\n      image: 'img:1'\n"
        "      mem_limit: 8g\n")
    port = next(k for k in SECTIONS["destinations[]"] if k.name == "port")
    assert example_flow("destinations[]", port).endswith(
        "destinations:\n  - host: h\n    port: 104\n    ae_title: A\n")


# -- the docs are the schema -----------------------------------------------------------------------

def test_docs_are_generated_from_the_schema() -> None:
    committed = (REPO / "docs" / "flows.md").read_text(encoding="utf-8")
    assert committed == flow_docs.render(), (
        "docs/flows.md is out of date: regenerate with `python -m raddeploy_provider.flows.docs > docs/flows.md`")


def test_docs_name_every_key_and_every_refused_kwarg() -> None:
    text = flow_docs.render()
    for section, key in ALL_KEYS:
        assert f"| `{key.name}`" in text, f"{section}.{key.name} is not in the docs"
        if key.example:
            assert f"`{key.name}: {key.example.replace('|', chr(92) + '|')}`" in text
    for name in DOCKER_KWARGS_REFUSED:
        assert f"| `{name}` |" in text


def test_flows_that_change_identities_say_so_and_are_warned_about(tmp_path: Path) -> None:
    """An anonymising export (new_patient) implies a new study; both are shown by `raddeploy validate`."""
    head = """
        name: export
        triggers: [{Modality: CT}]
        models: [{image: "m@sha256:%s", inputs: {src: /in}, outputs: {dst: /out}}]
        destinations: [{host: archive, port: 104, ae_title: RESEARCH}]
    """ % ("0" * 64)
    plain = load_flow(write(tmp_path, head, "plain.yaml"))
    assert (plain.new_study, plain.new_patient, plain.provenance, plain.warnings) == (False, False, True, ())
    study = load_flow(write(tmp_path, head + "    new_study: allowed\n", "study.yaml"))
    assert (study.new_study, study.new_patient) == (True, False)
    assert [str(w) for w in study.warnings] == [
        f"{study.source}:5: new_study: results may carry another Study Instance UID than the input's: the output "
        "guard does not check it (only for a flow meant to change identities, such as an anonymising export)"]
    anon = load_flow(write(tmp_path, head + "    new_patient: allowed\n        provenance: off\n", "anon.yaml"))
    assert (anon.new_study, anon.new_patient, anon.provenance) == (True, True, False)
    assert [w.field for w in anon.warnings] == ["new_patient"]
    with pytest.raises(FlowError, match=r"new_study: unknown choice 'yes' \(use one of refused, allowed\)"):
        load_flow(write(tmp_path, head + "    new_study: 'yes'\n", "bad.yaml"))


def test_raddeploy_model_without_mounts_has_raddeploys_defaults_and_its_results_are_sent(tmp_path: Path) -> None:
    """RadDeploy's simplest flow with a destination: its model reads /input and /output is sent."""
    flow = load_flow(write(tmp_path, """
        triggers:
          - Modality: ["^CT$"]
        models:
          - docker_kwargs:
              image: "seg:1"
        destinations:
          - {host: tps, port: 104, ae_title: TPS}
    """))
    (model,) = flow.models
    assert (model.inputs, model.outputs, model.sent_outputs) == ({"src": "/input"}, {"dst": "/output"}, ["dst"])
    assert flow.warnings == ()  # anchored: no overlap warning
    # a native model gives its mounts itself: without them nothing is sent, and that is an error
    assert error_of(tmp_path, """
        triggers: [{Modality: CT}]
        models: [{image: "seg:1"}]
        destinations: [{host: tps, port: 104, ae_title: TPS}]
    """) == ("F:3: destinations: results go somewhere, but no model writes a `dst` output "
             "(name the output to send `dst` (or `dst_<something>`))")


def test_review_deadline_and_notify_load_and_their_mistakes_are_errors(tmp_path: Path) -> None:
    body = ("models: [{image: 'a:1', inputs: {src: /in}, outputs: {dst: /out}}]\n"
            "destinations: [{host: tps, port: 104, ae_title: TPS}]\n")
    flow = load_flow(write(tmp_path, HEAD + body + "review: required\nreviewers: [dr_a, dr_b]\nreview_timeout: 2h\n"
                           "on_review_timeout: approve\ndeadline: 20m\n"
                           "notify: {on: [failure, delivery, failure], webhook: ops, email: physics@x.example}\n"))
    assert (flow.review.reviewers, flow.review.timeout, flow.review.on_timeout) == (("dr_a", "dr_b"), 7200.0, "approve")
    assert flow.deadline == 1200.0
    assert (flow.notify.on, flow.notify.webhook, flow.notify.email) == (("failure", "delivery"), "ops", ("physics@x.example",))
    plain = load_flow(write(tmp_path, HEAD + body, "plain.yaml"))
    assert (plain.review, plain.deadline, plain.notify.on, plain.notify.webhook) == (None, None, None, None)

    assert error_of(tmp_path, HEAD + body + "reviewers: [dr_a]\n") == (
        "F:5: reviewers: given without `review: required` (add `review: required`, or remove it)")
    assert error_of(tmp_path, HEAD + "models: [{image: 'a:1'}]\nreview: required\n") == (
        "F:4: review: nothing of this flow is sent, so there is nothing to review (send a `dst` output somewhere, "
        "or remove `review`)")
    assert error_of(tmp_path, HEAD + body + "notify: {on: [failure, late]}\n") == (
        "F:5: notify.on: unknown event 'late' (use failure, rejection, deadline, delivery)")
    assert error_of(tmp_path, HEAD + body + "deadline: 0\n") == (
        "F:5: deadline: a timeout must be longer than 0 (leave it out for no timeout)")
