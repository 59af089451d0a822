"""``raddeploy echo`` and ``raddeploy send`` against a real DCMTK storescp, through ``main``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from dicom_factory import make_series
from peers import StoreSCP, free_port, make_certificates, only_ct
from raddeploy.cli import main, parse_address

pytestmark = pytest.mark.integration


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``raddeploy ARGV``."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def target(scp: StoreSCP) -> str:
    return f"{scp.ae_title}@127.0.0.1:{scp.port}"


def sop_uids(paths: list[Path]) -> set[str]:
    return {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths}


# -- echo ----------------------------------------------------------------------------------

def test_echo_a_live_node(storescp, capsys) -> None:
    code, out, err = run(capsys, "echo", target(storescp))

    assert (code, err) == (0, "")
    assert out.strip() == f"C-ECHO to {target(storescp)}: success (0x0000)"


def test_echo_a_dead_port_exits_3_saying_what_to_check(capsys) -> None:
    port = free_port()

    code, out, err = run(capsys, "echo", f"PACS@127.0.0.1:{port}", "--connect-timeout", "2")

    assert (code, out) == (3, "")
    assert err.startswith("error: ") and f"127.0.0.1:{port}" in err and "check" in err, err


def test_echo_with_a_calling_ae_and_timeout(storescp, capsys) -> None:
    code, out, _ = run(capsys, "echo", target(storescp), "--calling-ae", "QA_ECHO", "--timeout", "5")

    assert code == 0 and "success (0x0000)" in out


# -- target syntax -------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "message"), [
    ("PACS@127.0.0.1", "target 'PACS@127.0.0.1': no port: write AE@HOST:PORT"),
    ("PACS@127.0.0.1:abc", "target 'PACS@127.0.0.1:abc': the port 'abc' is not a number"),
    ("@127.0.0.1:104", "the AE title before '@' is empty"),
    ("PACS@:104", "no host between '@' and ':'"),
    ("127.0.0.1:104", "target '127.0.0.1:104': no AE title: write AE@HOST:PORT"),
    ("PACS@::1:104", "write an IPv6 address in brackets: AE@[::1]:104"),
    ("PACS@[::1]104", "write an IPv6 address in brackets, then the port"),
    ("PACS@127.0.0.1:0", "target 'PACS@127.0.0.1:0': the port is 0: set the node's TCP port (1-65535"),
    ("A_VERY_LONG_AE_TITLE@h:104", "the AE title 'A_VERY_LONG_AE_TITLE' is not an AE title: use 1-16 characters"),
])
def test_a_bad_target_exits_2_saying_how_to_write_it(capsys, text, message) -> None:
    code, out, err = run(capsys, "echo", text)

    assert (code, out) == (2, "")
    assert err.startswith("error: ") and message in err, err


def test_targets_that_parse() -> None:
    assert parse_address("PACS@pacs.hospital.local:104") == {"host": "pacs.hospital.local", "port": 104,
                                                               "ae_title": "PACS"}
    assert parse_address("PACS@[::1]:11112") == {"host": "::1", "port": 11112, "ae_title": "PACS"}
    assert parse_address("tps_eclipse") is None  # a connection id


def test_bad_tls_options_name_the_option(capsys, tmp_path) -> None:
    code, _, err = run(capsys, "echo", "PACS@127.0.0.1:104", "--ca", str(tmp_path / "ca.pem"))
    assert code == 2 and "--ca is set but --tls is off: turn --tls on" in err, err

    code, _, err = run(capsys, "echo", "PACS@127.0.0.1:104", "--tls", "--key", str(tmp_path / "k.pem"))
    assert code == 2 and "--key is set without --cert" in err, err

    code, _, err = run(capsys, "echo", "PACS@127.0.0.1:104", "--tls", "--ca", str(tmp_path / "ca.pem"))
    assert code == 2 and f"--ca {tmp_path / 'ca.pem'} cannot be read on this host" in err, err


# -- send ----------------------------------------------------------------------------------

def test_send_a_folder_recursively(storescp, tmp_path, capsys) -> None:
    ct = make_series(tmp_path / "study" / "ct", slices=3, size=8)
    mr = make_series(tmp_path / "study" / "deeper" / "mr", modality="MR", slices=2, size=8)

    code, out, err = run(capsys, "send", str(tmp_path / "study"), "--to", target(storescp))

    assert (code, err) == (0, "")
    assert out.splitlines() == [f"sending 5 files to {target(storescp)} ...",
                                f"{target(storescp)}: 5 accepted (0 with a warning), 0 not accepted"]
    assert sop_uids(storescp.files()) == sop_uids(ct.files + mr.files)


def test_send_files_and_folders_with_json_and_associations(storescp, tmp_path, capsys) -> None:
    one = make_series(tmp_path / "a", slices=1, size=8)
    folder = make_series(tmp_path / "b", slices=2, size=8)

    code, out, _ = run(capsys, "send", str(one.files[0]), str(tmp_path / "b"), "--to", target(storescp),
                       "--associations", "2", "--json")

    assert code == 0
    summary = json.loads(out)
    assert (summary["node"], summary["accepted"], summary["refused"], summary["unreachable"]) == (
        target(storescp), 3, 0, None)
    assert sop_uids(storescp.files()) == sop_uids(one.files + folder.files)


def test_send_lists_what_was_not_accepted_and_exits_1(storescp, tmp_path, capsys) -> None:
    series = make_series(tmp_path / "out", slices=2, size=8)
    (tmp_path / "out" / "notes.txt").write_text("not DICOM")

    code, out, _ = run(capsys, "send", str(tmp_path / "out"), "--to", target(storescp))

    assert code == 1
    lines = out.splitlines()
    assert lines[1] == f"{target(storescp)}: 2 accepted (0 with a warning), 1 not accepted"
    assert lines[2] == "not accepted (1): SOP Instance UID, status, reason"
    assert lines[3].startswith(f"  {tmp_path / 'out' / 'notes.txt'}  no status  not a DICOM Part 10 file")
    assert sop_uids(storescp.files()) == sop_uids(series.files)




def test_send_lists_refused_instances_by_sop_uid(tmp_path, capsys) -> None:
    scp = StoreSCP(tmp_path / "scp", ae_title="ONLYCT", extra_args=only_ct(tmp_path))
    ct = make_series(tmp_path / "study" / "ct", slices=2, size=8)
    mr = make_series(tmp_path / "study" / "mr", modality="MR", slices=1, size=8)
    try:
        code, out, _ = run(capsys, "send", str(tmp_path / "study"), "--to", target(scp))
    finally:
        scp.stop()

    assert code == 1
    [mr_uid] = sop_uids(mr.files)
    assert out.splitlines()[1:] == [
        f"{target(scp)}: 2 accepted (0 with a warning), 1 not accepted",
        "not accepted (1): SOP Instance UID, status, reason",
        f"  {mr_uid}  no status  not sent: the node does not support SOP class MR Image Storage "
        "(1.2.840.10008.5.1.4.1.1.4)"]
    assert sop_uids(scp.files()) == sop_uids(ct.files)


def test_send_to_a_dead_port_exits_3(tmp_path, capsys) -> None:
    make_series(tmp_path / "out", slices=1, size=8)
    port = free_port()

    code, out, _ = run(capsys, "send", str(tmp_path / "out"), "--to", f"PACS@127.0.0.1:{port}")

    assert code == 3
    assert "0 accepted" in out and f"unreachable: PACS@127.0.0.1:{port}" in out, out


def test_send_a_missing_path_exits_2(capsys, tmp_path) -> None:
    code, _, err = run(capsys, "send", str(tmp_path / "nope"), "--to", "PACS@127.0.0.1:104")

    assert code == 2 and f"{tmp_path / 'nope'}: no such file or folder" in err


def test_echo_and_send_over_tls(tmp_path, capsys) -> None:
    pki = make_certificates(tmp_path / "pki")
    scp = StoreSCP(tmp_path / "tls-scp", ae_title="TLSSCP",
                   extra_args=("+tls", str(pki["server.key"]), str(pki["server.crt"]), "+cf", str(pki["ca.crt"])))
    try:
        tls = ("--tls", "--ca", str(pki["ca.crt"]), "--cert", str(pki["client.crt"]), "--key", str(pki["client.key"]))
        code, out, err = run(capsys, "echo", f"TLSSCP@127.0.0.1:{scp.port}", *tls)
        assert (code, out.strip()) == (0, f"C-ECHO to TLSSCP@127.0.0.1:{scp.port} (TLS): success (0x0000)"), err

        series = make_series(tmp_path / "out", slices=2, size=8)
        code, out, err = run(capsys, "send", str(tmp_path / "out"), "--to", f"TLSSCP@localhost:{scp.port}", *tls)
        assert code == 0 and f"TLSSCP@localhost:{scp.port} (TLS): 2 accepted" in out, out + err
        assert sop_uids(scp.files()) == sop_uids(series.files)

        code, _, err = run(capsys, "echo", f"TLSSCP@127.0.0.1:{scp.port}")  # plain TCP to a TLS port
        assert code == 3 and "error: " in err, err
    finally:
        scp.stop()


# -- a connection as the target ------------------------------------------------------------

def test_a_connection_from_the_environment(storescp, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_QA_PACS", json.dumps({
        "conn_type": "dicom", "host": "127.0.0.1", "port": storescp.port,
        "extra": {"ae_title": storescp.ae_title, "calling_ae_title": "RADDEPLOY_QA", "max_associations": 2}}))
    series = make_series(tmp_path / "out", slices=2, size=8)

    code, out, _ = run(capsys, "echo", "qa_pacs")
    assert code == 0 and out.strip() == f"C-ECHO to {target(storescp)}: success (0x0000)"

    code, out, _ = run(capsys, "send", str(tmp_path / "out"), "--to", "qa_pacs")
    assert code == 0 and f"{target(storescp)}: 2 accepted" in out
    assert sop_uids(storescp.files()) == sop_uids(series.files)


def test_a_connection_s_bad_field_or_absence(capsys, monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW_CONN_BAD_PACS", json.dumps({
        "conn_type": "dicom", "host": "127.0.0.1", "port": 104, "extra": {"ae_title": "PACS", "max_associations": 0}}))

    code, _, err = run(capsys, "echo", "bad_pacs")
    assert code == 2 and "connection 'bad_pacs': max_associations is 0: set how many" in err, err

    monkeypatch.delenv("AIRFLOW_CONN_NO_SUCH_PACS", raising=False)
    code, _, err = run(capsys, "echo", "no_such_pacs")
    assert code == 2 and "no connection 'no_such_pacs' in AIRFLOW_CONN_NO_SUCH_PACS or Airflow's metadata DB" in err

    monkeypatch.setenv("AIRFLOW_CONN_BROKEN", '{"conn_type": "dicom", "host": "h", "port": "abc"}')
    code, _, err = run(capsys, "echo", "broken")
    assert code == 2 and "AIRFLOW_CONN_BROKEN is set but is not a connection (Expected integer value for `port`" in err


def test_an_address_target_does_not_import_airflow(storescp) -> None:
    probe = ("import sys; from raddeploy.cli import main; "
             f"code = main(['echo', {target(storescp)!r}]); "
             "print(code, sorted(m for m in sys.modules if m.split('.')[0] == 'airflow'))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)

    assert done.stdout.splitlines()[-1] == "0 []", done.stderr
