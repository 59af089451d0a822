"""The fingerprint sensor and its trigger, on a real study store (no scheduler needed).

The sensor is run the way the task runner does: execute(context) either returns (ready) or
raises TaskDeferred with the trigger; the trigger's run() is driven with asyncio; then
execute_complete(context, event) as the runner would call it on resume.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pydicom
import pytest
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException, TaskDeferred
from airflow.triggers.base import TaskSuccessEvent

from pydicom.uid import generate_uid

from dicom_factory import make_series
from raddeploy_provider.flows import load_flow
from raddeploy_provider.sensors.fingerprint import FingerprintSensor
from raddeploy_provider.utils.intake import sender as _sender
from raddeploy_provider.store import NEVER, StudyStore
from raddeploy_provider.triggers.study_ready import BACKSTOP, StudyReadyTrigger

FLOW = """
name: Two modalities
id: two_modalities
triggers:
  - Modality: CT
  - Modality: MR
grouping: {{quiet_period: 0.2s, timeout: 30m, on_timeout: {on_timeout}}}
models: [{{image: "m:1", inputs: {{src: /in}}, outputs: {{dst: /out}}}}]
"""


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, index_url: str | None):
    """A study store, and the settings the sensor and the trigger read (the index on each backend)."""
    monkeypatch.setenv("RADDEPLOY_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("RADDEPLOY_INDEX_URL", index_url or "")
    monkeypatch.delenv("RADDEPLOY_AIRFLOW_PASSWORD", raising=False)  # no run notes here
    store = StudyStore(tmp_path / "data", index_url=index_url)
    ct = make_series(tmp_path / "ct", slices=2)
    mr = make_series(tmp_path / "mr", modality="MR", slices=1, study_uid=ct.study_uid)

    def push(series, association: str = "", calling_ae: str = "SCANNER", peer: str = "127.0.0.1:5000") -> None:
        for f in getattr(series, "files", series):
            temp = store.layout.incoming / f.name
            shutil.copy(f, temp)
            store.ingest(temp, lambda h: {"two_modalities": NEVER}, calling_ae=calling_ae, peer=peer,
                         association=association)

    def sensor(on_timeout: str = "skip") -> FingerprintSensor:
        path = tmp_path / f"flow_{on_timeout}.yaml"
        path.write_text(FLOW.format(on_timeout=on_timeout))
        return FingerprintSensor(task_id="fingerprint", flow=load_flow(path), poll_interval=0.05)

    run_id = f"{ct.study_uid}.1"
    context = {"dag": SimpleNamespace(dag_id="two_modalities"), "run_id": run_id,
               "dag_run": SimpleNamespace(conf={"study_uid": ct.study_uid, "generation": 1})}
    return SimpleNamespace(store=store, ct=ct, mr=mr, push=push, sensor=sensor, context=context,
                           run_dir=tmp_path / "data" / "runs" / "two_modalities" / run_id)


def run_trigger(trigger: StudyReadyTrigger, timeout: float = 10.0) -> dict:
    async def first_event():
        async for event in trigger.run():
            return event.payload
    return asyncio.run(asyncio.wait_for(first_event(), timeout))


def test_ready_study_is_taken_at_once(world):
    world.push(world.ct)
    world.push(world.mr)
    time.sleep(0.25)  # the quiet period
    summary = world.sensor().execute(world.context)
    assert summary["instances"] == 3 and len(summary["series"]) == 2
    assert len(list((world.run_dir / "input").iterdir())) == 3
    assert world.store.index.run_state("two_modalities", world.context["run_id"]) == "closing"
    manifest = json.loads((world.run_dir / "manifest.json").read_text())
    assert manifest["study_uid"] == world.ct.study_uid and manifest["flow"]["name"] == "Two modalities"
    assert len(manifest["input"]["sop_instance_uids"]) == 3
    # The send tasks read who to return results to from here, never from the index.
    assert manifest["sender"] == {"calling_ae": "SCANNER", "host": "127.0.0.1"}


def other_series(template: Path, folder: Path, **values) -> Path:
    """One more instance of the study in a series of its own, with ``values`` set."""
    ds = pydicom.dcmread(template)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_an_instance_added_by_another_node_does_not_become_the_sender(world, tmp_path):
    """A peer that pushes one instance with a known Study Instance UID must not receive the study's results."""
    world.push(world.ct)
    world.push(world.mr)
    added = other_series(world.ct.files[0], tmp_path / "added", Modality="SR")  # no trigger matches it
    world.push([added], calling_ae="INTRUDER", peer="10.9.9.9:4000")
    time.sleep(0.25)
    world.sensor().execute(world.context)
    manifest = json.loads((world.run_dir / "manifest.json").read_text())
    assert manifest["sender"] == {"calling_ae": "SCANNER", "host": "127.0.0.1"}
    assert added.name not in {p.name for p in (world.run_dir / "input").iterdir()}


def test_matched_input_from_two_nodes_or_two_patients_has_no_sender(world, tmp_path):
    world.push(world.ct)
    world.push([other_series(world.mr.files[0], tmp_path / "mr2")], calling_ae="INTRUDER", peer="10.9.9.9:4000")
    time.sleep(0.25)
    world.sensor().execute(world.context)
    manifest = json.loads((world.run_dir / "manifest.json").read_text())
    assert manifest["sender"] is None
    assert manifest["sender_refused"] == ("the matched input came from 2 nodes (INTRUDER@10.9.9.9, "
                                          "SCANNER@127.0.0.1): results go back to none of them")


def test_matched_input_of_two_patients_has_no_sender(world):
    """The store refuses another patient's instance (0xC001); should two ever be in one input, no sender."""
    world.push(world.ct)
    ct = world.store.index.instances(world.ct.study_uid)
    other = dataclasses.replace(ct[0], sop_uid="1.2.3.4", tags={**ct[0].tags, "PatientID": "SOMEONE-ELSE"})
    assert _sender([*ct, other]) == {"sender": None,
                                     "sender_refused": "the matched input instances carry different Patient IDs"}
    assert _sender(ct) == {"sender": {"calling_ae": "SCANNER", "host": "127.0.0.1"}}


def test_missing_trigger_defers_then_the_trigger_fires_when_it_arrives(world):
    world.push(world.ct)
    sensor = world.sensor()
    with pytest.raises(TaskDeferred) as deferred:
        sensor.execute(world.context)
    trigger = deferred.value.trigger
    assert isinstance(trigger, StudyReadyTrigger)
    path, kwargs = trigger.serialize()  # what the triggerer stores and rebuilds it from
    assert path == "raddeploy_provider.triggers.study_ready.StudyReadyTrigger"
    assert "postgresql" not in json.dumps(kwargs)  # the index URL, its password in it, is the triggerer's own
    trigger = StudyReadyTrigger(**kwargs)

    world.push(world.mr, association="a1")  # arrives while the trigger waits; still sending
    start = time.monotonic()
    threading.Timer(0.5, world.store.index.association_ended, args=("a1",)).start()
    event = run_trigger(trigger)
    assert event == {"status": "ready"}
    assert time.monotonic() - start >= 0.5  # not before the association ended
    summary = sensor.execute_complete(world.context, event)
    assert summary["instances"] == 3


@pytest.mark.parametrize("policy, expected", [("skip", AirflowSkipException), ("fail", AirflowFailException)])
def test_timeout_follows_on_timeout_and_closes_the_run(world, policy, expected):
    world.push(world.ct)
    sensor = world.sensor(policy)
    trigger = StudyReadyTrigger(flow_file=str(sensor.flow.source), dag_id="two_modalities",
                                run_id=world.context["run_id"], study_uid=world.ct.study_uid,
                                data_dir=str(world.store.layout.root), deadline=time.time() + 0.3,
                                poll_interval=0.05)
    event = run_trigger(trigger)
    assert event["status"] == "timeout" and event["unmet"] == [1]
    assert "trigger 2: Modality=MR - not received yet" in event["waiting_for"]
    with pytest.raises(expected, match="not complete after 1800 s: trigger 2: Modality=MR - not received yet"):
        sensor.execute_complete(world.context, event)
    # Closed all the same: a later MR opens generation 2 instead of joining a dead run.
    assert world.store.index.run_state("two_modalities", world.context["run_id"]) == "closing"


def test_timeout_with_proceed_takes_what_matched(world):
    world.push(world.ct)
    sensor = world.sensor("proceed")
    event = {"status": "timeout", "waiting_for": "trigger 2: Modality=MR - not received yet", "unmet": [1]}
    summary = sensor.execute_complete(world.context, event)
    assert summary["instances"] == 2 and summary["series"] == [world.ct.series_uid]


def test_a_run_without_a_study_uid_fails_with_what_to_do(world):
    context = {**world.context, "dag_run": SimpleNamespace(conf={})}
    with pytest.raises(AirflowFailException, match=r'trigger with \{"study_uid": "..."\}'):
        world.sensor().execute(context)


def started_trigger(sensor: FingerprintSensor, context: dict, data_dir: str = "") -> StudyReadyTrigger:
    """The trigger as the triggerer builds it for a sensor that starts there: the serialized start
    arguments, with the sensor's template fields rendered for this run (run id, study)."""
    args = sensor.start_trigger_args
    assert sensor.start_from_trigger and args.trigger_cls == "raddeploy_provider.triggers.study_ready.StudyReadyTrigger"
    assert set(sensor.template_fields) <= set(args.trigger_kwargs)  # the ones the triggerer renders
    kwargs = json.loads(json.dumps(args.trigger_kwargs))  # stored in the serialized DAG: plain data only
    assert kwargs["run_id"] == "{{ run_id }}" and "dag_run.conf" in kwargs["study_uid"]
    kwargs.update(run_id=context["run_id"], study_uid=context["dag_run"].conf.get("study_uid", ""), data_dir=data_dir)
    return StudyReadyTrigger(**kwargs)


def test_started_on_the_triggerer_it_takes_the_input_and_ends_the_task_there(world):
    world.push(world.ct)
    world.push(world.mr)
    sensor = world.sensor()
    trigger = started_trigger(sensor, world.context)

    async def events():
        return [event async for event in trigger.run()]
    [event] = asyncio.run(asyncio.wait_for(events(), 10))
    assert isinstance(event, TaskSuccessEvent)  # no worker resumes it
    summary = event.xcoms["return_value"]
    assert summary == {"study_uid": world.ct.study_uid, "instances": 3,
                       "series": sorted([world.ct.series_uid, world.mr.series_uid])}
    assert len(list((world.run_dir / "input").iterdir())) == 3
    assert world.store.index.run_state("two_modalities", world.context["run_id"]) == "closing"
    manifest = json.loads((world.run_dir / "manifest.json").read_text())
    assert manifest["sender"] == {"calling_ae": "SCANNER", "host": "127.0.0.1"}


def test_started_on_the_triggerer_its_deadline_is_airflows_timeout_less_the_backstop(world):
    """Airflow sets the deferral's timeout from the sensor's start (grouping.timeout + BACKSTOP); the
    trigger answers BACKSTOP before it, with what it waited for (here: 0.3 s from now)."""
    from datetime import datetime, timedelta, timezone
    world.push(world.ct)  # the MR never comes
    trigger = started_trigger(world.sensor("fail"), world.context)
    trigger.timeout_after = datetime.now(timezone.utc) + timedelta(seconds=BACKSTOP + 0.3)
    event = run_trigger(trigger)
    assert event["status"] == "timeout" and "Modality=MR - not received yet" in event["waiting_for"]


def test_an_input_the_triggerer_cannot_take_is_left_to_a_worker(world):
    world.push(world.ct)
    world.push(world.mr)
    world.run_dir.mkdir(parents=True)
    (world.run_dir / "input").write_text("not a folder")  # the links cannot be made here
    sensor = world.sensor()
    assert run_trigger(started_trigger(sensor, world.context)) == {"status": "ready"}
    (world.run_dir / "input").unlink()  # mended; the worker's resume takes it
    assert sensor.execute_complete(world.context, {"status": "ready"})["instances"] == 3


def test_a_flow_that_wants_decompressed_input_is_resumed_on_a_worker(world, tmp_path):
    path = tmp_path / "flow_uncompressed.yaml"
    path.write_text(FLOW.format(on_timeout="skip") + "input: {transfer_syntax: uncompressed}\n")
    sensor = FingerprintSensor(task_id="fingerprint", flow=load_flow(path), poll_interval=0.05)
    world.push(world.ct)
    world.push(world.mr)
    assert run_trigger(started_trigger(sensor, world.context)) == {"status": "ready"}
    assert not world.run_dir.exists()  # nothing taken on the triggerer


def test_started_for_a_run_without_a_study_uid_the_worker_says_what_to_do(world):
    context = {**world.context, "dag_run": SimpleNamespace(conf={})}
    sensor = world.sensor()
    event = run_trigger(started_trigger(sensor, context))
    assert event["status"] == "error"
    with pytest.raises(AirflowFailException, match=r'trigger with \{"study_uid": "..."\}'):
        sensor.execute_complete(context, event)
