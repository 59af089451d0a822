"""The DAG each flow shape becomes, and the container settings and mounts of its model tasks.

Flows are written in files and loaded as the DAG file does (``load_flow`` then ``build_dag``);
nothing runs: the assertions are on the tasks, their edges and the operators' arguments.
``_prepare_mounts`` is ours: it is run on a real run folder under ``tmp_path``.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from airflow.sdk.exceptions import AirflowException
from docker.types import Mount

from flow_factory import ensemble_flow, write
from raddeploy_provider.config import load_settings
from raddeploy_provider.dag_factory import build_dag
from raddeploy_provider.flows import load_flow
from raddeploy_provider.flows.model import ModelSpec
from raddeploy_provider.operators.dicom_send import DicomSendOperator
from raddeploy_provider.operators.model import ModelOperator
from raddeploy_provider.sensors.fingerprint import FingerprintSensor


@pytest.fixture(autouse=True)
def _default_gpu_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RADDEPLOY_GPU_POOL", "RADDEPLOY_GPU_QUEUE"):
        monkeypatch.delenv(name, raising=False)


def dag_of(tmp_path: Path, text: str, name: str = "flow.yaml"):
    return build_dag(load_flow(write(tmp_path, text, name)))


def edges(dag) -> set[tuple[str, str]]:
    return {(task.task_id, down) for task in dag.tasks for down in task.downstream_task_ids}


def tasks(dag) -> dict:
    return {task.task_id: task for task in dag.tasks}


def test_five_fold_ensemble(tmp_path: Path) -> None:
    dag = dag_of(tmp_path, ensemble_flow())
    folds = [f"model_{i}" for i in range(5)]
    assert edges(dag) == ({("fingerprint", fold) for fold in folds}
                          | {(fold, "model_5") for fold in folds}
                          | {("model_5", "send_0_STORESCP")})
    by_id = tasks(dag)
    assert isinstance(by_id["fingerprint"], FingerprintSensor)
    assert all(isinstance(by_id[name], ModelOperator) for name in [*folds, "model_5"])
    assert by_id["send_0_STORESCP"].sources == ["dst"]
    assert by_id["model_5"].execution_timeout == timedelta(seconds=1800)
    assert by_id["model_5"].force_pull is True and by_id["model_0"].force_pull is False


DIAMOND = """
name: "dag_flow.yaml"
triggers:
  - Modality: ["MR"]
return_to_sender_on_port: [10002]
models:
  - docker_kwargs: {image: "busybox:1.36", command: "sh -c 'cp -r /input/* /output1/'"}
    input_mounts: {src: /input}
    output_mounts: {CT: /output1, STRUCT: /output2}
  - docker_kwargs: {image: "busybox:1.36"}
    input_mounts: {STRUCT: /input}
    output_mounts: {STRUCT_POSTPROCESS1: /output}
    gpu: True
  - docker_kwargs: {image: "busybox:1.36"}
    input_mounts: {STRUCT: /input}
    output_mounts: {STRUCT_POSTPROCESS: /output}
  - docker_kwargs: {image: "busybox:1.36"}
    input_mounts: {STRUCT_POSTPROCESS: /struct, STRUCT_POSTPROCESS1: /struct1, CT: /ct}
    output_mounts: {dst: /output}
destinations: []
priority: 1
"""


def test_raddeploy_dag_flow_diamond(tmp_path: Path) -> None:
    dag = dag_of(tmp_path, DIAMOND)
    assert dag.dag_id == "dag_flow.yaml"
    assert edges(dag) == {
        ("fingerprint", "model_0"),
        ("model_0", "model_1"), ("model_0", "model_2"), ("model_0", "model_3"),  # CT skips the middle
        ("model_1", "model_3"), ("model_2", "model_3"),
        ("model_3", "send_to_sender_10002"),
    }
    send = tasks(dag)["send_to_sender_10002"]
    assert isinstance(send, DicomSendOperator)
    assert (send.return_to_sender_port, send.sources, send.host, send.port, send.ae_title) == (
        10002, ["dst"], None, None, None)


def test_old_chained_form_is_a_chain(tmp_path: Path) -> None:
    dag = dag_of(tmp_path, """
        name: chained
        triggers: [{Modality: CT}]
        models:
          - {docker_kwargs: {image: "reg:1"}, input_dir: /input, output_dir: /output}
          - {docker_kwargs: {image: "seg:1"}, input_dir: /input, output_dir: /output}
          - {docker_kwargs: {image: "post:1"}, input_dir: /input, output_dir: /output}
        destinations: [{host: 10.0.0.5, port: 104, ae_title: ARIA}]
    """)
    assert edges(dag) == {("fingerprint", "model_0"), ("model_0", "model_1"), ("model_1", "model_2"),
                          ("model_2", "send_0_ARIA")}
    assert tasks(dag)["send_0_ARIA"].sources == ["dst"]


def test_several_dst_outputs_and_destinations(tmp_path: Path) -> None:
    dag = dag_of(tmp_path, """
        name: many
        triggers: [{Modality: CT}]
        models:
          - name: ct
            image: "ct:1"
            inputs: {src: /input}
            outputs: {dst_ct: /output, mask: /mask}
          - name: rt
            image: "rt:1"
            inputs: {mask: /input}
            outputs: {dst: /output, dst_rtstruct: /rt}
          - name: qa
            image: "qa:1"
            inputs: {src: /input}
            outputs: {report: /output}
          - name: log
            image: "log:1"
            inputs: {report: /input}
        destinations:
          - connection: tps eclipse
          - {host: 10.0.0.5, port: 104, ae_title: ARIA, calling_ae_title: RADDEPLOY}
        return_to_sender: [104]
    """)
    sends = ["send_0_tps_eclipse", "send_1_ARIA", "send_to_sender_104"]
    assert edges(dag) == ({("fingerprint", "ct"), ("fingerprint", "qa"), ("ct", "rt"), ("qa", "log")}
                          | {(model, send) for model in ("ct", "rt") for send in sends})
    by_id = tasks(dag)
    for send in sends:  # every send task sends every dst* output of every model
        assert by_id[send].sources == ["dst_ct", "dst", "dst_rtstruct"]
        assert by_id[send].retries == 3
    conn, node, back = (by_id[s] for s in sends)
    assert (conn.dicom_conn_id, conn.host, conn.port, conn.ae_title, conn.calling_ae_title) == (
        "tps eclipse", None, None, None, None)
    assert (node.dicom_conn_id, node.host, node.port, node.ae_title, node.calling_ae_title) == (
        None, "10.0.0.5", 104, "ARIA", "RADDEPLOY")
    assert (back.return_to_sender_port, back.dicom_conn_id, back.host) == (104, None, None)


@pytest.mark.parametrize("priority", [0, 2, 4])
def test_priority_orders_sends_models_sensors_then_flows(tmp_path: Path, priority: int) -> None:
    dag = dag_of(tmp_path, f"""
        name: p
        priority: {priority}
        triggers: [{{Modality: CT}}]
        models:
          - {{name: a, image: "a:1", gpu: 1, inputs: {{src: /in}}, outputs: {{x: /out}}}}
          - {{name: b, image: "b:1", inputs: {{x: /in}}, outputs: {{dst: /out}}}}
        destinations: [{{connection: tps}}]
        return_to_sender: [104]
    """)
    assert sorted(t.task_id for t in dag.tasks) == ["a", "b", "fingerprint", "send_0_tps", "send_to_sender_104"]
    weights = {t.task_id: t.priority_weight for t in dag.tasks}
    assert {str(t.weight_rule) for t in dag.tasks} == {"absolute"}
    # runs under way first: sends, then GPU models, CPU models, then the sensors of new runs; the
    # flow's priority within each
    assert weights == {"fingerprint": 1 + priority, "a": 16 + priority, "b": 11 + priority,
                       "send_0_tps": 26 + priority, "send_to_sender_104": 26 + priority}


def test_gpu_models_go_to_the_gpu_pool_and_queue(tmp_path: Path) -> None:
    text = """
        name: g
        triggers: [{Modality: CT}]
        models:
          - {name: cpu, image: "a:1", inputs: {src: /in}, outputs: {x: /out}, gpu: false}
          - {name: one, image: "b:1", inputs: {x: /in}, outputs: {y: /out}, gpu: true}
          - {name: two, image: "c:1", inputs: {y: /in}, outputs: {dst: /out}, gpu: 2}
    """
    by_id = tasks(dag_of(tmp_path, text))
    assert (by_id["cpu"].pool, by_id["cpu"].pool_slots, by_id["cpu"].queue) == ("default_pool", 1, "default")
    assert (by_id["one"].pool, by_id["one"].pool_slots, by_id["one"].queue) == ("raddeploy_gpu", 1, "gpu")
    assert (by_id["two"].pool, by_id["two"].pool_slots, by_id["two"].queue) == ("raddeploy_gpu", 2, "gpu")
    assert by_id["fingerprint"].pool == "default_pool"


def test_gpu_pool_and_queue_come_from_the_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADDEPLOY_GPU_POOL", "big_gpus")
    monkeypatch.setenv("RADDEPLOY_GPU_QUEUE", "a100")
    task = tasks(dag_of(tmp_path, """
        name: g
        triggers: [{Modality: CT}]
        models: [{name: seg, image: "a:1", gpu: 1}]
    """))["seg"]
    assert (task.pool, task.pool_slots, task.queue) == ("big_gpus", 1, "a100")


def test_model_retries_and_timeout(tmp_path: Path) -> None:
    by_id = tasks(dag_of(tmp_path, """
        name: r
        triggers: [{Modality: CT}]
        models:
          - {name: a, image: "a:1", outputs: {x: /out}, retries: 2, timeout: 2h}
          - {name: b, image: "b:1", inputs: {x: /in}}
          - {docker_kwargs: {image: "c:1"}, timeout: 1800}
    """))
    assert (by_id["a"].retries, by_id["a"].execution_timeout) == (2, timedelta(hours=2))
    assert (by_id["b"].retries, by_id["b"].execution_timeout) == (0, None)
    assert by_id["model_2"].execution_timeout == timedelta(seconds=1800)


def test_docker_settings_of_the_model_operator(tmp_path: Path) -> None:
    by_id = tasks(dag_of(tmp_path, """
        name: docker
        version: "2.0"
        triggers: [{Modality: CT}]
        extra: {site: aarhus}
        models:
          - name: native
            image: registry.local/seg:1.1
            entrypoint: ["/bin/sh", "-c"]
            command: ["python", "/app/run.py", 3]
            environment: {THREADS: 4}
            mem_limit: 24g
            shm_size: 512m
            user: "1000:1000"
            network: bridge
            pull: always
          - docker_kwargs:
              image: busybox:1.36
              command: sh -c 'ls /input'
              entrypoint: /bin/sh
              working_dir: /app
              labels: {team: physics}
              ipc_mode: shareable
              cpu_shares: 512
              nano_cpus: 2000000000
    """))
    native = by_id["native"]
    assert isinstance(native, ModelOperator)
    assert native.image == "registry.local/seg:1.1"
    assert native.entrypoint == ["/bin/sh", "-c"]
    assert native.command == ["python", "/app/run.py", "3"]
    assert native.environment == {"THREADS": "4"}
    assert (native.mem_limit, native.shm_size, native.user) == (24 * 1024**3, 512 * 1024**2, "1000:1000")
    assert (native.network_mode, native.force_pull) == ("bridge", True)
    assert (native.flow_id, native.flow_version, native.flow_extra) == ("docker", "2.0", {"site": "aarhus"})
    # The operator removes the container itself, after reading why it ended.
    assert (native.auto_remove, native.mount_tmp_dir) == ("never", False)

    rad = by_id["model_1"]
    assert (rad.command, rad.entrypoint) == ("sh -c 'ls /input'", "/bin/sh")
    assert (rad.network_mode, rad.force_pull, rad.mem_limit, rad.shm_size, rad.user) == (
        "none", False, None, None, None)
    assert (rad.working_dir, rad.labels, rad.ipc_mode) == ("/app", {"team": "physics"}, "shareable")
    assert rad.model.host_config == {"cpu_shares": 512, "nano_cpus": 2000000000}


# -- the mounts of a model task ----------------------------------------------------------------

RUN_ID = "manual__2024-01-01T00:00:00+00:00"


@pytest.fixture
def folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    data, static = tmp_path / "data", tmp_path / "static"
    monkeypatch.setenv("RADDEPLOY_DATA", str(data))
    monkeypatch.setenv("RADDEPLOY_STATIC", str(static))
    run = data / "runs" / "hn_flow" / RUN_ID
    return SimpleNamespace(run=run, static=static, run_dir=load_settings().data.run("hn_flow", RUN_ID))


def operator(**model: object) -> ModelOperator:
    return ModelOperator(task_id="segment", model=ModelSpec(name="segment", image="seg:1", **model),
                         flow_id="hn_flow")


def test_prepare_mounts(folders: SimpleNamespace) -> None:
    (folders.run / "input").mkdir(parents=True)
    (folders.run / "ct_reg").mkdir()
    (folders.run / "dst").mkdir()
    (folders.run / "dst" / "stale.dcm").write_text("from a failed try")
    (folders.static / "hn_weights").mkdir(parents=True)
    op = operator(inputs={"src": "/dicom", "ct_reg": "/input"}, outputs={"dst": "/output", "dst_rt": "/rt"},
                  static_mounts={"hn_weights": "/model"}, config={"fold": "all", "folds": [0, 1]},
                  config_path="/config/settings.yaml")

    mounts = op._prepare_mounts(folders.run_dir, load_settings())

    config_file = folders.run / "config" / "segment" / "config.yaml"
    assert mounts == [
        Mount(target="/dicom", source=str(folders.run / "input"), type="bind", read_only=True),
        Mount(target="/input", source=str(folders.run / "ct_reg"), type="bind", read_only=True),
        Mount(target="/model", source=str(folders.static / "hn_weights"), type="bind", read_only=True),
        Mount(target="/output", source=str(folders.run / "dst"), type="bind", read_only=False),
        Mount(target="/rt", source=str(folders.run / "dst_rt"), type="bind", read_only=False),
        Mount(target="/config/settings.yaml", source=str(config_file), type="bind", read_only=True),
    ]
    assert list((folders.run / "dst").iterdir()) == []  # a retry starts from an empty output
    assert (folders.run / "dst_rt").is_dir()
    assert yaml.safe_load(config_file.read_text()) == {"fold": "all", "folds": [0, 1]}


def test_prepare_mounts_without_config_mounts_no_config(folders: SimpleNamespace) -> None:
    (folders.run / "input").mkdir(parents=True)
    assert operator(inputs={"src": "/input"})._prepare_mounts(folders.run_dir, load_settings()) == [
        Mount(target="/input", source=str(folders.run / "input"), type="bind", read_only=True),
    ]
    assert not (folders.run / "config").exists()


def test_missing_static_asset_is_named(folders: SimpleNamespace) -> None:
    (folders.static / "hn_weights").mkdir(parents=True)
    op = operator(static_mounts={"hn_weights": "/model", "AwesomeModel2": "/model2"})
    with pytest.raises(AirflowException) as info:
        op._prepare_mounts(folders.run_dir, load_settings())
    missing = folders.static / "AwesomeModel2"
    assert str(info.value) == (f"static asset 'AwesomeModel2' is missing: no folder {missing}. "
                               "Put the asset there (RADDEPLOY_STATIC) or fix static_mounts in the flow.")


def test_missing_input_folder_is_named(folders: SimpleNamespace) -> None:
    (folders.run / "input").mkdir(parents=True)
    op = operator(inputs={"src": "/input", "ct_reg": "/ct"})
    with pytest.raises(AirflowException) as info:
        op._prepare_mounts(folders.run_dir, load_settings())
    assert str(info.value) == (f"input 'ct_reg' has no folder at {folders.run / 'ct_reg'}: did the task that "
                               "writes it succeed? Clear that task to run it again.")


def test_review_stands_between_every_sending_model_and_every_send_task(tmp_path: Path) -> None:
    from raddeploy_provider.operators.review import ReviewOperator

    dag = dag_of(tmp_path, """
        name: reviewed
        triggers: [{Modality: CT}]
        review: required
        reviewers: [dr_a, dr_b]
        review_timeout: 2h
        models:
          - {name: seg, image: "a:1", inputs: {src: /in}, outputs: {dst: /out, mid: /mid}}
          - {name: dose, image: "b:1", inputs: {mid: /in}, outputs: {dst_dose: /out}}
        destinations: [{host: tps, port: 104, ae_title: TPS}]
        return_to_sender: [104]
    """)
    assert edges(dag) == {("fingerprint", "seg"), ("seg", "dose"), ("seg", "review"), ("dose", "review"),
                          ("review", "send_0_TPS"), ("review", "send_to_sender_104")}
    review = dag.get_task("review")
    assert isinstance(review, ReviewOperator)
    assert review.assigned_users == [{"id": "dr_a", "name": "dr_a"}, {"id": "dr_b", "name": "dr_b"}]
    assert (review.response_timeout, review.defaults, review.options) == (timedelta(hours=2), ["Reject"],
                                                                         ["Approve", "Reject"])
    assert review.sent == ["dst", "dst_dose"]
    plain = dag_of(tmp_path, "name: plain\ntriggers: [{Modality: CT}]\nmodels: [{image: 'a:1', inputs: {src: /i}, "
                             "outputs: {dst: /o}}]\ndestinations: [{host: t, port: 104, ae_title: T}]\n", "plain.yaml")
    assert "review" not in plain.task_ids


def test_a_retry_of_the_review_applies_an_answer_airflow_lost_but_never_reuses_an_applied_one(
        tmp_path: Path, monkeypatch) -> None:
    """Airflow 3.3 can lose the resume of an approval task a person answered within moments of its
    parking: a late executor report of the same try marks it failed (its retry applies the answer
    of the try before), or execute runs again on the same try (the answer on this try is applied,
    not overwritten by asking again). The lost resume is a fault of Airflow's we cannot cause on demand: the answer's
    REST read is replaced here (tests/e2e/test_review_gate.py reads a real one)."""
    from raddeploy_provider.store import manifest

    dag = dag_of(tmp_path, """
        name: reviewed
        triggers: [{Modality: CT}]
        review: required
        models: [{name: seg, image: "a:1", inputs: {src: /in}, outputs: {dst: /out}}]
        destinations: [{host: tps, port: 104, ae_title: TPS}]
    """)
    op = dag.get_task("review")
    assert op.retries == 1
    asked, answered = [], {}
    answer = {"chosen_options": ["Reject"], "params_input": {"reason": "r"}, "responded_by_user": {"name": "dr_a"}}
    monkeypatch.setattr("raddeploy_provider.operators.review.hitl_answer",
                        lambda dag_id, run_id, task_id, try_number: asked.append(try_number) or answered.get(try_number))
    monkeypatch.setenv("RADDEPLOY_DATA", str(tmp_path / "data"))
    run = load_settings().data.run(dag.dag_id, "r1")
    context = {"ti": SimpleNamespace(try_number=1), "run_id": "r1"}
    assert op._lost_answer(context, run) is None and asked == [1]  # a first try, unanswered: asks the reviewer
    answered[1] = answer  # answered, then Airflow ran execute again on the same try: applied, not asked again
    assert op._lost_answer(context, run) is answer and asked == [1, 1]
    context["ti"].try_number, asked[:] = 2, []  # ... or the answered try was failed and retried
    assert op._lost_answer(context, run) is answer and asked == [2, 1]
    states = {1: "success"}
    monkeypatch.setattr("raddeploy_provider.operators.review.try_state",
                        lambda dag_id, run_id, task_id, try_number: states.get(try_number))
    manifest.record(run, "review", {"decision": "rejected", "by": "dr_a", "reason": "r", "try": 1})
    assert op._lost_answer(context, run) is None and asked == [2, 1]  # applied once: a cleared review asks again
    states[1], asked[:] = "failed", []  # ... unless the try that applied it lost its end and Airflow retried it
    assert op._lost_answer(context, run) is answer and asked == [1]
    context["ti"].try_number, asked[:] = 3, []  # a try later than the retry: a person cleared it, asks again
    assert op._lost_answer(context, run) is None and asked == []
