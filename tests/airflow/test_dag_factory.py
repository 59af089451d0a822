"""DAGs built from flow files: task graph, broken flows contained, parsing context honoured."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from raddeploy_provider.dag_factory import build_all
from raddeploy_provider.operators.dicom_send import DicomSendOperator
from raddeploy_provider.operators.model import ModelOperator
from raddeploy_provider.sensors.fingerprint import FingerprintSensor

REPO = Path(__file__).resolve().parents[2]

DIAMOND = """
name: Diamond
id: diamond
triggers: [{Modality: CT}]
models:
  - {name: prep, image: img:1, inputs: {src: /in}, outputs: {ct: /out}}
  - {name: left, image: img:1, inputs: {ct: /in}, outputs: {a: /out}}
  - {name: right, image: img:1, inputs: {ct: /in}, outputs: {b: /out}, network: bridge}
  - {name: merge, image: img:1, inputs: {a: /a, b: /b}, outputs: {dst: /out}, timeout: 90s}
destinations:
  - {host: 10.0.0.5, port: 104, ae_title: ARIA}
  - connection: tps_eclipse
"""

BROKEN = """
name: Broken
triggers: [{Modality: CT}]
modles: []
"""


@pytest.fixture
def flows(tmp_path: Path) -> Path:
    (tmp_path / "diamond.yaml").write_text(DIAMOND)
    (tmp_path / "broken.yml").write_text(BROKEN)
    return tmp_path


def test_diamond_flow_becomes_sensor_models_and_senders(flows):
    dags = build_all(flows)
    dag = dags["diamond"]
    tasks = {t.task_id: t for t in dag.tasks}
    assert isinstance(tasks["fingerprint"], FingerprintSensor)
    assert all(isinstance(tasks[n], ModelOperator) for n in ("prep", "left", "right", "merge"))
    edges = {(t.task_id, d) for t in dag.tasks for d in t.downstream_task_ids}
    assert edges == {
        ("fingerprint", "prep"), ("prep", "left"), ("prep", "right"), ("left", "merge"), ("right", "merge"),
        ("merge", "send_0_ARIA"), ("merge", "send_1_tps_eclipse"),
    }
    send = tasks["send_0_ARIA"]
    assert isinstance(send, DicomSendOperator)
    assert (send.host, send.port, send.ae_title, send.sources) == ("10.0.0.5", 104, "ARIA", ["dst"])
    assert tasks["send_1_tps_eclipse"].dicom_conn_id == "tps_eclipse"
    assert send.retries == 3 and tasks["merge"].retries == 0
    assert tasks["fingerprint"].retries == 1  # Airflow's resume-after-defer race (dag_factory.py)
    assert tasks["merge"].execution_timeout.total_seconds() == 90
    assert tasks["prep"].network_mode == "none" and tasks["right"].network_mode == "bridge"
    assert dag.is_paused_upon_creation is False
    # Safe by default: provenance stamped, the guard checks patient and study.
    assert tasks["merge"].provenance is True and tasks["prep"].provenance is True
    assert (send.check_patient, send.check_study) == (True, True)
    assert send.retry_exponential_backoff == 2.0  # a multiplier in Airflow 3 (True would mean 1: no backoff)


def test_flow_identity_and_provenance_options_reach_the_tasks(tmp_path):
    (tmp_path / "export.yaml").write_text(DIAMOND.replace("id: diamond", "id: export\nnew_patient: allowed\n"
                                                                        "provenance: off"))
    tasks = {t.task_id: t for t in build_all(tmp_path)["export"].tasks}
    assert tasks["merge"].provenance is False
    assert (tasks["send_0_ARIA"].check_patient, tasks["send_0_ARIA"].check_study) == (False, False)


def test_broken_flow_is_a_visible_paused_dag_and_others_still_load(flows):
    dags = build_all(flows)
    assert set(dags) == {"diamond", "invalid_broken"}
    broken = dags["invalid_broken"]
    assert broken.is_paused_upon_creation is True
    assert "invalid" in broken.tags
    assert f"{flows / 'broken.yml'}:4: modles: unknown key (did you mean `models`?)" in broken.description


def test_parsing_context_builds_only_the_running_dag(flows, monkeypatch):
    monkeypatch.setenv("_AIRFLOW_PARSING_CONTEXT_DAG_ID", "diamond")
    assert set(build_all(flows)) == {"diamond"}


def test_dag_file_imports_cleanly_in_airflow(flows, tmp_path):
    """The DAG files as the dag-processor loads them: no import errors, both flows and the maintenance DAG found."""
    code = ("from airflow.dag_processing.dagbag import DagBag; "
            f"b = DagBag(dag_folder={str(REPO / 'dags')!r}); "
            "print(sorted(b.dag_ids)); print(b.import_errors)")
    env = {"RADDEPLOY_FLOWS": str(flows), "AIRFLOW_HOME": str(tmp_path / "af"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-2] == "['diamond', 'invalid_broken', 'raddeploy_retention']"  # the provider's maintenance DAG too
    assert lines[-1] == "{}"


#: What a task's DAG parse must not import: every Airflow task start parses the DAG file, and
#: these cost 0.3-0.6 s of CPU there; the operators import them when they run.
HEAVY = ("pydicom", "pynetdicom", "numpy", "PIL")


def test_a_dag_parse_imports_no_dicom_or_numpy_library(flows, tmp_path):
    code = ("import sys; from airflow.dag_processing.dagbag import DagBag; "
            f"b = DagBag(dag_folder={str(REPO / 'dags')!r}); "
            "print(sorted(b.dag_ids)); "
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))")
    env = {"RADDEPLOY_FLOWS": str(flows), "AIRFLOW_HOME": str(tmp_path / "af"),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    dag_ids, imported = out.stdout.strip().splitlines()[-2:]
    assert dag_ids == "['diamond', 'invalid_broken', 'raddeploy_retention']"
    assert imported == "[]", f"a DAG parse imported {imported}: import it inside the operator's execute"


def test_airflow_lists_the_provider(tmp_path):
    env = {"AIRFLOW_HOME": str(tmp_path / "af"), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    out = subprocess.run(["airflow", "providers", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "raddeploy-provider" in out.stdout


def test_no_task_of_a_flow_renders_flow_text_as_a_template(flows):
    """Flow strings reach the operators' fields; Jinja must never render them (`{{ conn.x.password }}`)."""
    for task in build_all(flows)["diamond"].tasks:
        # The sensor's two are ours (its run and study, rendered on the triggerer), never flow text.
        ours = {"run_id": "{{ run_id }}", "study_uid": "{{ (dag_run.conf or {}).get('study_uid') or '' }}"} \
            if isinstance(task, FingerprintSensor) else {}
        assert {name: getattr(task, name) for name in task.template_fields} == ours, task.task_id
        assert tuple(getattr(task, "template_ext", ())) == (), task.task_id


def test_the_sensor_starts_on_the_triggerer_as_the_scheduler_reads_it(flows):
    """What the scheduler and the triggerer see is the serialized DAG: start_from_trigger, the
    trigger's arguments and the sensor's template fields (rendered on the triggerer) survive it."""
    from airflow.serialization.serialized_objects import DagSerialization

    dag = build_all(flows)["diamond"]
    task = DagSerialization.from_dict(DagSerialization.to_dict(dag)).get_task("fingerprint")
    assert task.start_from_trigger is True
    args = task.start_trigger_args
    assert (args.trigger_cls, args.next_method) == ("raddeploy_provider.triggers.study_ready.StudyReadyTrigger",
                                                    "execute_complete")
    kwargs = args.trigger_kwargs.get("__var", args.trigger_kwargs)  # as stored: Airflow-encoded, as the triggerer decodes
    assert kwargs["run_id"] == "{{ run_id }}" and kwargs["take_input"] is True
    assert kwargs["dag_id"] == "diamond" and kwargs["data_dir"] == ""
    assert {"run_id", "study_uid"} <= set(task.template_fields)
    assert args.timeout.total_seconds() > 0  # Airflow's backstop behind the trigger's own deadline
