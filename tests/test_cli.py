"""The ``raddeploy`` command: validate, match and graph, run in-process through ``main``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from dicom_factory import make_series
from flow_factory import write
from raddeploy.cli import main
from raddeploy_provider.flows import load_flows

STUDY = "1.2.826.0.1.3680043.99.7"
OTHER_STUDY = "1.2.826.0.1.3680043.99.8"
IMAGE = "reg.local/seg@sha256:" + "0" * 64  # pinned: a mutable tag is a warning
NOT_DICOM = "not a DICOM file (no 'DICM' prefix after the preamble)"

HN = f"""
name: HN CT OARs
id: hn_ct_oars
triggers:
  - Modality: CT
    SeriesDescription: ["(?i).*(head|neck).*", "~(?i).*scout.*"]
  - Modality: MR
    SeriesDescription: "(?i)t1.*"
input: {{layout: [Modality, SeriesInstanceUID]}}
models:
  - {{name: seg, image: "{IMAGE}", inputs: {{src: /in}}, outputs: {{dst: /out}}}}
destinations:
  - connection: tps
"""

DIAMOND = f"""
name: Diamond
triggers: [{{Modality: CT}}]
grouping: {{quiet_period: 10s, timeout: 30m, on_timeout: fail}}
models:
  - {{name: merge, image: "{IMAGE}", inputs: {{a: /a, b: /b}}, outputs: {{dst: /out, dst_pdf: /pdf}},
     timeout: 90s}}
  - {{name: left, image: "reg.local/left:1.2", inputs: {{ct: /in}}, outputs: {{a: /out}}, gpu: true}}
  - {{name: prep, image: "reg.local/prep:3", inputs: {{src: /in}}, outputs: {{ct: /out}}}}
  - {{name: right, image: "reg.local/right:1", inputs: {{ct: /in, src: /dicom}}, outputs: {{b: /out}}, gpu: 2}}
destinations:
  - {{host: 10.0.0.5, port: 104, ae_title: ARIA}}
  - connection: tps_eclipse
return_to_sender: [11112]
"""

BROKEN = """
name: Broken
triggers: [{Modality: CT}]
modles: []
"""


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str], list[str]]:
    """Exit code, stdout lines and stderr lines of ``raddeploy ARGV``."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


def sop_uid(path: Path) -> str:
    return pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID


# -- validate ------------------------------------------------------------------------------

def test_validate_reports_every_flow_and_exits_1_on_an_error(tmp_path: Path, capsys) -> None:
    write(tmp_path / "flows", HN, "hn.yaml")
    write(tmp_path / "flows" / "more", DIAMOND, "diamond.yml")
    broken = write(tmp_path / "flows", BROKEN, "broken.yml")
    [error] = load_flows(broken).errors

    code, out, err = run(capsys, "validate", str(tmp_path / "flows"))

    assert code == 1
    assert out == [
        f"ok: {tmp_path}/flows/hn.yaml: hn_ct_oars (2 triggers, 1 model, 1 destination)",
        f"ok: {tmp_path}/flows/more/diamond.yml: diamond (1 trigger, 4 models, 2 destinations)",
        f"error: {error}",
        "2 flows ok, 1 error, 0 warnings",
    ]
    assert str(error).startswith(f"{broken}:3: modles: ")
    assert err == []


def test_validate_valid_files_exit_0_and_warnings_do_not_fail(tmp_path: Path, capsys) -> None:
    hn = write(tmp_path, HN, "hn.yaml")
    latest = write(tmp_path, HN.replace(IMAGE, "reg.local/seg:latest").replace("hn_ct_oars", "l"), "latest.yaml")
    [warning] = load_flows(latest).warnings

    code, out, _ = run(capsys, "validate", str(hn), str(latest))

    assert code == 0
    assert out == [
        f"ok: {hn}: hn_ct_oars (2 triggers, 1 model, 1 destination)",
        f"ok: {latest}: l (2 triggers, 1 model, 1 destination)",
        f"warning: {warning}",
        "2 flows ok, 0 errors, 1 warning",
    ]
    assert str(warning).startswith(f"{latest}:10: models[0].image: ")


def test_validate_json(tmp_path: Path, capsys) -> None:
    hn = write(tmp_path / "flows", HN, "hn.yaml")
    broken = write(tmp_path / "flows", BROKEN, "broken.yml")
    latest = write(tmp_path, HN.replace(IMAGE, "reg.local/seg").replace("hn_ct_oars", "l"), "latest.yaml")
    [error], [warning] = load_flows(broken).errors, load_flows(latest).warnings

    code, out, _ = run(capsys, "validate", "--json", str(tmp_path / "flows"), str(latest))

    assert code == 1
    assert json.loads("\n".join(out)) == {
        "flows": [{"file": str(hn), "dag_id": "hn_ct_oars", "name": "HN CT OARs", "spelling": "native"},
                  {"file": str(latest), "dag_id": "l", "name": "HN CT OARs", "spelling": "native"}],
        "errors": [{"file": str(broken), "line": 3, "field": "modles", "message": error.message,
                    "hint": error.hint}],
        "warnings": [{"file": str(latest), "line": 10, "field": "models[0].image", "message": warning.message,
                      "hint": warning.hint}],
    }


def test_validate_missing_path_is_an_error_and_empty_folder_a_warning(tmp_path: Path, capsys) -> None:
    (tmp_path / "empty").mkdir()

    code, out, _ = run(capsys, "validate", str(tmp_path / "nope.yaml"), str(tmp_path / "empty"))

    assert code == 1
    assert out == [
        f"error: {tmp_path}/nope.yaml: (file): no such file or folder (give a flow file or a folder of flow files)",
        f"warning: {tmp_path}/empty: (file): no flow files (*.yaml, *.yml) in this folder (check the path)",
        "0 flows ok, 1 error, 1 warning",
    ]


def test_validate_defaults_to_the_flows_folder_setting(tmp_path: Path, capsys, monkeypatch) -> None:
    write(tmp_path, HN, "hn.yaml")
    monkeypatch.setenv("RADDEPLOY_FLOWS", str(tmp_path))

    code, out, _ = run(capsys, "validate")

    assert (code, out) == (0, [f"ok: {tmp_path}/hn.yaml: hn_ct_oars (2 triggers, 1 model, 1 destination)",
                               "1 flow ok, 0 errors, 0 warnings"])


def test_validate_says_a_raddeploy_flow_searches_and_how_to_anchor_a_pattern(tmp_path: Path, capsys) -> None:
    """RadDeploy's `Modality: CT` also matches RTSTRUCT there: it still loads, with the anchored form."""
    flow = write(tmp_path, """
        triggers:
          - Modality: [CT]
            SeriesDescription: ["(?i)thorax", "~SR"]
          - Modality: ["(?i)mr|pt"]
        models:
          - docker_kwargs: {image: "seg:1"}
        destinations: [{host: h, port: 104, ae_title: TPS}]
        """, "rad.yaml")

    code, out, _ = run(capsys, "validate", str(flow))

    search = "(RadDeploy flow files search anywhere in the value)"
    assert (code, out) == (0, [
        f"ok: {flow}: rad (2 triggers, 1 model, 1 destination; RadDeploy spelling: patterns match anywhere in a value)",
        f"warning: {flow}:2: triggers[0].Modality: pattern 'CT' matches Modality CT, CTPROTOCOL, IVOCT, OCT, "
        f"RTSTRUCT {search} (anchor it to match one value: '^CT$')",
        # SeriesDescription has no defined terms: '~SR' is not checked
        f"warning: {flow}:4: triggers[1].Modality: pattern '(?i)mr|pt' matches Modality MR, OPT, OPTBSV, OPTENF, PT, "
        f"SMR {search} "
        "(anchor it to match one value: '(?i)^(?:mr|pt)$')",
        "1 flow ok, 0 errors, 2 warnings",
    ])


def test_console_script_validate_json_without_airflow(tmp_path: Path) -> None:
    flow = write(tmp_path, HN, "hn.yaml")
    script = Path(sys.executable).with_name("raddeploy")

    done = subprocess.run([str(script), "validate", "--json", str(flow)], capture_output=True, text=True,
                          timeout=60)

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"flows": [{"file": str(flow), "dag_id": "hn_ct_oars", "name": "HN CT OARs", "spelling": "native"}],
                                       "errors": [], "warnings": []}
    # and none of validate, match, graph imports Airflow (the listener host may not have it)
    probe = ("import sys; from raddeploy.cli import main; "
             f"main(['validate', {str(flow)!r}]); main(['graph', {str(flow)!r}]); "
             f"main(['match', {str(flow)!r}, {str(tmp_path)!r}]); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'airflow'))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.stdout.splitlines()[-1] == "[]", done.stderr


# -- match ---------------------------------------------------------------------------------

def test_match_explains_each_file_and_lists_src_as_laid_out(tmp_path: Path, capsys) -> None:
    flow = write(tmp_path, HN, "hn.yaml")
    data = tmp_path / "dicom"
    ct = make_series(data / "ct", modality="CT", slices=2, size=8, study_uid=STUDY, description="Head Neck")
    mr = make_series(data / "mr", modality="MR", slices=1, size=8, study_uid=STUDY, description="T1 MPRAGE")
    make_series(data / "scout", modality="CT", slices=1, size=8, study_uid=STUDY, description="Head scout")
    write(data, "not DICOM", "notes.txt")
    src = sorted([(f"CT/{ct.series_uid}/CT_{ct.series_uid}_{sop_uid(f)}.dcm", f"ct/{f.name}") for f in ct.files]
                 + [(f"MR/{mr.series_uid}/MR_{mr.series_uid}_{sop_uid(mr.files[0])}.dcm", "mr/MR0000.dcm")])

    code, out, err = run(capsys, "match", str(flow), str(data))

    assert code == 0
    ct_not_t2 = ["    trigger 2: not satisfied",
                 "      Modality: pattern 'MR' did not match value 'CT'",
                 "      SeriesDescription: pattern '(?i)t1.*' did not match value 'Head Neck'"]
    assert out == [
        f"flow hn_ct_oars (HN CT OARs): {flow}",
        "  trigger 1: Modality=CT, SeriesDescription=(?i).*(head|neck).*, SeriesDescription!~(?i).*scout.*",
        "  trigger 2: Modality=MR, SeriesDescription=(?i)t1.*",
        "",
        f"study {STUDY}: 4 files",
        "  ct/CT0000.dcm",
        "    trigger 1: satisfied",
        *ct_not_t2,
        "  ct/CT0001.dcm",
        "    trigger 1: satisfied",
        *ct_not_t2,
        "  mr/MR0000.dcm",
        "    trigger 1: not satisfied",
        "      Modality: pattern 'CT' did not match value 'MR'",
        "      SeriesDescription: pattern '(?i).*(head|neck).*' did not match value 'T1 MPRAGE'",
        "    trigger 2: satisfied",
        "  scout/CT0000.dcm",
        "    trigger 1: not satisfied",
        "      SeriesDescription: exclusion '~(?i).*scout.*' matched value 'Head scout'",
        "    trigger 2: not satisfied",
        "      Modality: pattern 'MR' did not match value 'CT'",
        "      SeriesDescription: pattern '(?i)t1.*' did not match value 'Head scout'",
        "  would run: yes",
        "  src: 3 files (layout Modality/SeriesInstanceUID, whole series), as the run's input/ would hold them",
        *[f"    {name}  <- {source}" for name, source in src],
        "",
        "unreadable: 1 file",
        f"  notes.txt: {NOT_DICOM}",
    ]
    assert err == []


def test_match_unmet_trigger_and_matched_instances_only(tmp_path: Path, capsys) -> None:
    flow = write(tmp_path, f"""
        name: Pelvis
        triggers:
          - {{Modality: CT, SeriesDescription: "~(?i).*scout.*", ImageType: AXIAL}}
          - {{Modality: MR, BodyPartExamined: PELVIS}}
        input: {{whole_series: false}}
        models: [{{image: "{IMAGE}", inputs: {{src: /in}}, outputs: {{dst: /out}}}}]
        """, "f.yaml")
    ct = make_series(tmp_path / "dicom", modality="CT", slices=2, size=8, study_uid=STUDY, description="Pelvis")
    ds = pydicom.dcmread(ct.files[1])
    ds.SeriesDescription = "Pelvis scout"
    ds.save_as(ct.files[1])

    code, out, _ = run(capsys, "match", str(flow), str(tmp_path / "dicom"))

    assert code == 1
    assert out == [
        f"flow pelvis (Pelvis): {flow}",
        "  trigger 1: Modality=CT, SeriesDescription!~(?i).*scout.*, ImageType=AXIAL",
        "  trigger 2: Modality=MR, BodyPartExamined=PELVIS",
        "",
        f"study {STUDY}: 2 files",
        "  CT0000.dcm",
        "    trigger 1: satisfied",
        "    trigger 2: not satisfied",
        "      Modality: pattern 'MR' did not match value 'CT'",
        "      BodyPartExamined: value missing (pattern 'PELVIS' needs one)",
        "  CT0001.dcm",
        "    trigger 1: not satisfied",
        "      SeriesDescription: exclusion '~(?i).*scout.*' matched value 'Pelvis scout'",
        "    trigger 2: not satisfied",
        "      Modality: pattern 'MR' did not match value 'CT'",
        "      BodyPartExamined: value missing (pattern 'PELVIS' needs one)",
        "  would run: no",
        "    unmet trigger 2: Modality=MR, BodyPartExamined=PELVIS",
        "  src: 1 file (layout flat, matched instances only), as the run's input/ would hold them",
        f"    CT_{ct.series_uid}_{sop_uid(ct.files[0])}.dcm  <- CT0000.dcm",
    ]


def test_match_judges_each_study_on_its_own(tmp_path: Path, capsys) -> None:
    """The CT of one study and the MR of another do not make a run: the sensor waits per study."""
    flow = write(tmp_path, HN, "hn.yaml")
    data = tmp_path / "dicom"
    make_series(data / "a_ct", modality="CT", slices=1, size=8, study_uid=STUDY, description="Neck")
    make_series(data / "b_mr", modality="MR", slices=1, size=8, study_uid=OTHER_STUDY, description="T1")

    code, out, _ = run(capsys, "match", str(flow), str(data))

    assert code == 1
    assert [line for line in out if not line.startswith("    ")] == [
        f"flow hn_ct_oars (HN CT OARs): {flow}",
        "  trigger 1: Modality=CT, SeriesDescription=(?i).*(head|neck).*, SeriesDescription!~(?i).*scout.*",
        "  trigger 2: Modality=MR, SeriesDescription=(?i)t1.*",
        "",
        f"study {STUDY}: 1 file",
        "  a_ct/CT0000.dcm",
        "  would run: no",
        "  src: 1 file (layout Modality/SeriesInstanceUID, whole series), as the run's input/ would hold them",
        "",
        f"study {OTHER_STUDY}: 1 file",
        "  b_mr/MR0000.dcm",
        "  would run: no",
        "  src: 1 file (layout Modality/SeriesInstanceUID, whole series), as the run's input/ would hold them",
    ]
    assert out.count("    unmet trigger 2: Modality=MR, SeriesDescription=(?i)t1.*") == 1
    assert out.count("    unmet trigger 1: Modality=CT, SeriesDescription=(?i).*(head|neck).*, "
                     "SeriesDescription!~(?i).*scout.*") == 1


def test_match_one_file_and_copies_of_one_instance(tmp_path: Path, capsys) -> None:
    flow = write(tmp_path, f"""
        name: CT
        triggers: [{{Modality: CT}}]
        models: [{{image: "{IMAGE}", inputs: {{src: /in}}, outputs: {{dst: /out}}}}]
        """, "f.yaml")
    ct = make_series(tmp_path / "dicom", modality="CT", slices=1, size=8, study_uid=STUDY)
    copy = tmp_path / "dicom" / "copy.dcm"
    copy.write_bytes(ct.files[0].read_bytes())
    name = f"CT_{ct.series_uid}_{sop_uid(ct.files[0])}.dcm"

    code, out, _ = run(capsys, "match", str(flow), str(ct.files[0]))
    assert code == 0
    assert out[4:] == ["  CT0000.dcm", "    trigger 1: satisfied", "  would run: yes",
                       "  src: 1 file (layout flat, whole series), as the run's input/ would hold them",
                       f"    {name}  <- CT0000.dcm"]

    code, out, _ = run(capsys, "match", str(flow), str(tmp_path / "dicom"))
    assert code == 0
    assert out[-2:] == ["  src: 1 file (layout flat, whole series), as the run's input/ would hold them",
                        f"    {name}  <- CT0000.dcm, copy.dcm"]


def test_match_nothing_readable(tmp_path: Path, capsys) -> None:
    flow = write(tmp_path, HN, "hn.yaml")
    write(tmp_path / "dicom", "", "a.dcm")

    code, out, _ = run(capsys, "match", str(flow), str(tmp_path / "dicom"))

    assert code == 1
    assert out[3:] == ["", f"no readable DICOM file under {tmp_path}/dicom", "", "unreadable: 1 file",
                       f"  a.dcm: {NOT_DICOM}"]


def test_match_exit_2_when_the_flow_or_the_folder_is_not_there(tmp_path: Path, capsys) -> None:
    broken = write(tmp_path, BROKEN, "broken.yml")
    [error] = load_flows(broken).errors
    hn = write(tmp_path, HN, "hn.yaml")

    assert run(capsys, "match", str(broken), str(tmp_path)) == (2, [], [f"error: {error}"])
    assert run(capsys, "match", str(tmp_path / "none.yaml"), str(tmp_path)) == (2, [], [
        f"error: {tmp_path}/none.yaml: (file): no such file or folder (give a flow file or a folder of flow files)"])
    assert run(capsys, "match", str(tmp_path), str(tmp_path)) == (2, [], [
        f"error: {tmp_path}: is a folder; give one flow file"])
    assert run(capsys, "match", str(hn), str(tmp_path / "nope")) == (2, [], [
        f"error: {tmp_path}/nope: no such file or folder"])


# -- graph ---------------------------------------------------------------------------------

def test_graph_of_a_diamond(tmp_path: Path, capsys) -> None:
    flow = write(tmp_path, DIAMOND, "diamond.yaml")

    code, out, err = run(capsys, "graph", str(flow))

    assert (code, err) == (0, [])
    assert out == [
        f"flow diamond (Diamond): {flow}",
        "",
        "fingerprint",
        "  waits:   until every trigger (1) is satisfied and the study has been quiet for 10s; after 30m: fail",
        "  out:     src (the matched instances; layout flat, whole series)",
        "prep",
        "  image:   reg.local/prep:3",
        "  gpu:     none",
        "  in:      src (/in)",
        "  out:     ct (/out)",
        "left",
        "  image:   reg.local/left:1.2",
        "  gpu:     1",
        "  in:      ct (/in)",
        "  out:     a (/out)",
        "right",
        "  image:   reg.local/right:1",
        "  gpu:     2",
        "  in:      ct (/in), src (/dicom)",
        "  out:     b (/out)",
        "merge",
        f"  image:   {IMAGE}",
        "  gpu:     none",
        "  in:      a (/a), b (/b)",
        "  out:     dst (/out), dst_pdf (/pdf)",
        "  sends:   dst, dst_pdf to 3 destinations",
        "  timeout: 1m30s",
        "send_0_ARIA",
        "  to:      ARIA@10.0.0.5:104",
        "  sends:   dst, dst_pdf of merge",
        "send_1_tps_eclipse",
        "  to:      connection tps_eclipse",
        "  sends:   dst, dst_pdf of merge",
        "send_to_sender_11112",
        "  to:      the sender of the study, on port 11112",
        "  sends:   dst, dst_pdf of merge",
        "",
        "edges (in run order):",
        "  fingerprint -> prep                  src",
        "  prep        -> left                  ct",
        "  prep        -> right                 ct",
        "  left        -> merge                 a",
        "  right       -> merge                 b",
        "  merge       -> send_0_ARIA           dst, dst_pdf",
        "  merge       -> send_1_tps_eclipse    dst, dst_pdf",
        "  merge       -> send_to_sender_11112  dst, dst_pdf",
    ]


def test_graph_says_when_results_go_nowhere(tmp_path: Path, capsys) -> None:
    flow = write(tmp_path, f"""
        name: Nowhere
        triggers: [{{Modality: CT}}]
        models: [{{name: seg, image: "{IMAGE}", inputs: {{src: /in}}, outputs: {{dst: /out}},
                   static_mounts: {{weights: /model}}}}]
        """, "f.yaml")

    code, out, _ = run(capsys, "graph", str(flow))

    assert code == 0
    assert out[5:] == [
        "seg",
        f"  image:   {IMAGE}",
        "  gpu:     none",
        "  in:      src (/in)",
        "  out:     dst (/out)",
        "  sends:   dst to nowhere: the flow has no destinations",
        "  static:  weights (/model)",
        "",
        "edges (in run order):",
        "  fingerprint -> seg  src",
    ]


def test_graph_of_a_broken_flow_exits_2(tmp_path: Path, capsys) -> None:
    broken = write(tmp_path, BROKEN, "broken.yml")
    [error] = load_flows(broken).errors

    assert run(capsys, "graph", str(broken)) == (2, [], [f"error: {error}"])
