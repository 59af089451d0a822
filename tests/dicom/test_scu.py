"""Sending stored files to real peers: DCMTK storescp (plain, restricted, TLS, forking, aborting)
and a scripted SCP on a raw socket for what storescp will not do (warnings, silence, parallel
associations counted). Byte-exact, thousands of instances, clear failures, bounded waits."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom.presentation import build_context, negotiate_as_acceptor

from dicom_factory import make_series
from peers import StoreSCP, free_port, make_certificates, only_ct
from raddeploy_provider.dicom import dimse
from raddeploy_provider.dicom.scu import (
    EXPLICIT_VR_LE, IMPLICIT_VR_LE, MAX_PDU_RECEIVED, Node, NodeUnreachable, SendError, SendReport, Tls, echo,
    send_files)

pytestmark = pytest.mark.integration


def payload(path: Path) -> bytes:
    raw = path.read_bytes()
    return raw[dimse.read_file_meta(raw).dataset_offset:]


def node_of(scp, **kwargs) -> Node:
    return Node("127.0.0.1", scp.port, scp.ae_title, **kwargs)


def assert_unreachable(report: SendReport, files: list[Path], *words: str) -> None:
    """One sentence naming the cause; every file "not sent"; the error is that sentence."""
    assert report.unreachable, report.results
    assert "\n" not in report.unreachable and report.unreachable.endswith("."), report.unreachable
    for word in words:
        assert word in report.unreachable, report.unreachable
    assert [r.path for r in report.results] == list(map(str, files))
    assert all(r.status is None and r.reason == "not sent" for r in report.results)
    assert not report.ok and report.accepted == []
    assert str(SendError(report)) == report.unreachable
    assert json.loads(json.dumps(report.summary()))["unreachable"] == report.unreachable


# -- storescp -------------------------------------------------------------------------------

def test_echo_and_send_series_byte_exact(storescp, tmp_path):
    node = node_of(storescp)
    assert echo(node) == 0
    series = make_series(tmp_path / "ct", slices=4)
    report = send_files(node, series.files)
    assert report.ok and sorted(report.accepted) == sorted(map(str, series.files))
    assert all(r.status == 0 and r.reason == "" and r.converted is None for r in report.results)
    received = storescp.files()
    assert sorted(payload(p) for p in received) == sorted(payload(p) for p in series.files)


def test_ct_byte_exact_in_many_pdus(tmp_path):
    """512x512 slices: ~33 P-DATA PDUs each at storescp's 16 KiB, 4 at 128 KiB."""
    series = make_series(tmp_path / "ct", slices=6, size=512)
    for pdu in ("16384", "131072"):
        scp = StoreSCP(tmp_path / f"out-{pdu}", extra_args=("-pdu", pdu))
        try:
            report = send_files(node_of(scp), series.files)
            assert report.ok, report.failed
            assert sorted(payload(p) for p in scp.files()) == sorted(payload(p) for p in series.files)
        finally:
            scp.stop()


def test_thousands_of_instances_without_a_stall(storescp, tmp_path):
    """The old pynetdicom sender could lose a response and stall (pynetdicom #435, #842, #850)."""
    series = make_series(tmp_path / "small", slices=1500, size=8)
    node = node_of(storescp, timeout=10)
    for attempt in range(3):
        t0 = time.monotonic()
        report = send_files(node, series.files)
        assert report.ok, f"attempt {attempt}: {list(report.failed.items())[:3]}"
        assert len(report.accepted) == 1500
        assert time.monotonic() - t0 < 30
    assert sorted(payload(p) for p in storescp.files()) == sorted(payload(p) for p in series.files)


def test_unreadable_file_is_reported_and_the_rest_sent(storescp, tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    series = make_series(tmp_path / "ct", slices=1)
    report: SendReport = send_files(node_of(storescp), [junk, *series.files, tmp_path / "missing.dcm"])
    assert report.accepted == [str(series.files[0])]
    assert "not a DICOM Part 10 file" in report.failed[str(junk)]
    assert "not a DICOM Part 10 file" in report.failed[str(tmp_path / "missing.dcm")]
    assert report.results[0].sop_instance_uid == "" and report.results[0].status is None
    assert str(SendError(report)).startswith(f"2 of 3 instances not accepted by {node_of(storescp)}: "
                                             "(unreadable file): not a DICOM Part 10 file")




def test_a_node_that_takes_one_sop_class_refuses_the_other(tmp_path):
    scp = StoreSCP(tmp_path / "out", extra_args=only_ct(tmp_path))
    ct = make_series(tmp_path / "ct", slices=3)
    mr = make_series(tmp_path / "mr", slices=2, modality="MR")
    mixed = [ct.files[0], mr.files[0], ct.files[1], mr.files[1], ct.files[2]]
    try:
        report = send_files(node_of(scp), mixed)
    finally:
        scp.stop()
    assert report.accepted == list(map(str, ct.files))
    refused = report.refused
    assert [r.path for r in refused] == list(map(str, mr.files))
    for r in refused:
        assert r.status is None and r.sop_instance_uid == dcmread(r.path).SOPInstanceUID
        assert r.reason == "not sent: the node does not support SOP class MR Image Storage (1.2.840.10008.5.1.4.1.1.4)"
    summary = report.summary()
    assert (summary["accepted"], summary["refused"], summary["warned"]) == (3, 2, 0)
    assert summary["refused_instances"][0] == {"sop_instance_uid": refused[0].sop_instance_uid, "status": None,
                                               "reason": refused[0].reason}
    message = str(SendError(report))
    assert message.startswith(f"2 of 5 instances not accepted by {node_of(scp)}: {refused[0].sop_instance_uid}: "
                              "not sent: the node does not support SOP class MR Image Storage")
    assert len(scp.files()) == 3


def test_more_than_128_contexts_take_several_associations(tmp_path):
    """70 SOP classes x 2 contexts (own syntax, uncompressed fallback): two associations."""
    base = make_series(tmp_path / "base", slices=1).files[0]
    files = []
    for i in range(70):
        ds = dcmread(base)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = f"1.2.826.0.1.3680043.8.498.777.{i + 1}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.8.498.778.{i + 1}"
        files.append(tmp_path / f"x{i}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    scp = StoreSCP(tmp_path / "out", extra_args=("-pm",))  # promiscuous: unknown SOP classes too
    try:
        report = send_files(node_of(scp), files)
    finally:
        scp.stop()
    assert report.ok, list(report.failed.items())[:3]
    assert len(scp.files()) == 70


def test_parallel_associations_deliver_everything_once(tmp_path):
    series = make_series(tmp_path / "small", slices=300, size=16)
    scp = StoreSCP(tmp_path / "out", extra_args=("--fork",))
    try:
        report = send_files(node_of(scp, max_associations=3), series.files)
    finally:
        scp.stop()
    assert report.ok and report.accepted == list(map(str, series.files))  # in the order given
    assert sorted(payload(p) for p in scp.files()) == sorted(payload(p) for p in series.files)


@pytest.mark.parametrize("option", ["--abort-during", "--abort-after"])
def test_storescp_aborting_gives_reasons_not_a_hang(tmp_path, option):
    series = make_series(tmp_path / "ct", slices=4, size=512)
    scp = StoreSCP(tmp_path / "out", extra_args=(option,))
    t0 = time.monotonic()
    try:
        report = send_files(node_of(scp, timeout=5), series.files)
    finally:
        scp.stop()
    assert time.monotonic() - t0 < 5
    first, *rest = report.results
    assert first.status is None and "the node aborted the association" in first.reason
    assert "not known whether the node stored it" in first.reason
    assert all(r.status is None and r.reason.startswith("not sent: the association was lost (the node aborted")
               for r in rest), [r.reason for r in rest]
    assert report.unreachable is None and not report.ok


# -- unreachable ------------------------------------------------------------------------------

def test_unreachable_node_is_one_sentence(tmp_path):
    series = make_series(tmp_path / "ct", slices=2)
    port = free_port()
    t0 = time.monotonic()
    report = send_files(Node("127.0.0.1", port, "NOBODY", timeout=3), series.files)
    assert time.monotonic() - t0 < 1
    assert_unreachable(report, series.files, "connection refused", f"port {port}")
    with pytest.raises(NodeUnreachable, match="connection refused"):
        echo(Node("127.0.0.1", port, "NOBODY"))


def test_a_silent_port_times_out_within_connect_timeout(tmp_path):
    series = make_series(tmp_path / "ct", slices=2)
    with socket.create_server(("127.0.0.1", 0)) as silent:  # the kernel accepts; nobody answers
        node = Node("127.0.0.1", silent.getsockname()[1], "SILENT", connect_timeout=1, max_associations=2)
        t0 = time.monotonic()
        report = send_files(node, series.files)
        assert time.monotonic() - t0 < 2
    assert_unreachable(report, series.files, "did not answer the association request within 1 s")


def test_a_rejected_association_is_unreachable_with_the_reason(tmp_path):
    series = make_series(tmp_path / "ct", slices=2)
    scp = StoreSCP(tmp_path / "out", extra_args=("--refuse",))
    try:
        report = send_files(node_of(scp), series.files)
        with pytest.raises(NodeUnreachable, match="rejected the association"):
            echo(node_of(scp))
    finally:
        scp.stop()
    assert_unreachable(report, series.files, "rejected the association: no reason given (permanent)",
                       "check the AE titles")


def test_empty_send_is_ok():
    report = send_files(Node("127.0.0.1", free_port(), "NOBODY"), [])
    assert report.ok and report.results == [] and report.unreachable is None


# -- TLS to storescp ----------------------------------------------------------------------------

@pytest.fixture
def certs(tmp_path):
    return make_certificates(tmp_path / "certs")


def tls_scp(folder: Path, certs: dict[str, Path], *extra: str) -> StoreSCP:
    return StoreSCP(folder, extra_args=("+tls", str(certs["server.key"]), str(certs["server.crt"]),
                                        "+cf", str(certs["ca.crt"]), *extra))


def test_tls_with_and_without_client_certificate(tmp_path, certs):
    series = make_series(tmp_path / "ct", slices=3, size=256)
    with_cert = Tls(str(certs["ca.crt"]), str(certs["client.crt"]), str(certs["client.key"]))
    anonymous = Tls(str(certs["ca.crt"]))
    required = tls_scp(tmp_path / "required", certs)  # -rc (default): a client certificate is required
    try:
        node = node_of(required, tls=with_cert)
        assert str(node).endswith(" (TLS)")
        assert echo(node) == 0
        report = send_files(node, series.files)
        assert report.ok, report.failed
        assert sorted(payload(p) for p in required.files()) == sorted(payload(p) for p in series.files)
        refused = send_files(node_of(required, tls=anonymous), series.files)
        assert_unreachable(refused, series.files, "TLS", "client certificate", "tls_cert_file")
    finally:
        required.stop()
    optional = tls_scp(tmp_path / "optional", certs, "-vc")  # verified when given
    try:
        report = send_files(node_of(optional, tls=anonymous), series.files)
        assert report.ok, report.failed
        assert len(optional.files()) == 3
    finally:
        optional.stop()


def test_tls_peer_certificate_that_does_not_verify(tmp_path, certs):
    other_ca = make_certificates(tmp_path / "other")["ca.crt"]
    series = make_series(tmp_path / "ct", slices=2)
    scp = tls_scp(tmp_path / "out", certs, "-vc")
    try:
        wrong_ca = send_files(node_of(scp, tls=Tls(str(other_ca))), series.files)
        system_cas = send_files(node_of(scp, tls=Tls()), series.files)
        mismatch = send_files(Node("127.0.0.2", scp.port, scp.ae_title, tls=Tls(str(certs["ca.crt"]))), series.files)
        unchecked = send_files(Node("127.0.0.2", scp.port, scp.ae_title,
                                    tls=Tls(str(certs["ca.crt"]), verify_hostname=False)), series.files)
        plain = send_files(node_of(scp), series.files)
    finally:
        scp.stop()
    assert_unreachable(wrong_ca, series.files, "certificate verify failed: self-signed certificate",
                       "set tls_ca_file")
    assert_unreachable(system_cas, series.files, "certificate verify failed", "the system's CAs", "set tls_ca_file")
    assert_unreachable(mismatch, series.files, "hostname mismatch", "'127.0.0.2'", "tls_verify_hostname off")
    assert unchecked.ok, unchecked.failed  # the chain is still verified, the name is not
    assert_unreachable(plain, series.files, "closed the connection", "expects TLS")


def test_tls_to_a_plain_port(storescp, tmp_path, certs):
    series = make_series(tmp_path / "ct", slices=1)
    report = send_files(node_of(storescp, tls=Tls(str(certs["ca.crt"]))), series.files)
    assert_unreachable(report, series.files, "TLS handshake")


def test_tls_settings_that_cannot_be_loaded(tmp_path, certs):
    series = make_series(tmp_path / "ct", slices=1)
    report = send_files(Node("127.0.0.1", free_port(), "X", tls=Tls(str(tmp_path / "nope.pem"))), series.files)
    assert_unreachable(report, series.files, "cannot set up TLS", "tls_ca_file")


# -- a scripted SCP ----------------------------------------------------------------------------

class ScriptedSCP:
    """Accepts every association (16 KiB PDUs) on a raw socket; ``answer(n)`` decides the n-th
    C-STORE (0-based): a status, "abort" (A-ABORT at the data set's first fragment), "silent"
    (no answer), or "big" (a PDU header over the sender's limit). Counts associations."""

    def __init__(self, answer=lambda n: 0x0000) -> None:
        self.answer = answer
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.ae_title = "SCRIPTED"
        self.received: list[str] = []  # SOP instance UIDs, in the order their data sets completed
        self.associations = 0
        self.lock = threading.Lock()
        self.count = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _read(conn: socket.socket, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise ConnectionError
            data += chunk
        return data

    def _pdu(self, conn: socket.socket) -> tuple[int, bytes]:
        pdu_type, _, length = dimse.PDU_HEAD.unpack(self._read(conn, 6))
        return pdu_type, self._read(conn, length)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                _, body = self._pdu(conn)
                rq = dimse.decode_associate_rq(body)
                proposed = rq.presentation_context_definition_list
                results, _ = negotiate_as_acceptor(proposed, [build_context(cx.abstract_syntax, cx.transfer_syntax)
                                                              for cx in proposed])
                conn.sendall(dimse.associate_ac(rq.called_ae_title, rq.calling_ae_title, results, 16384))
                with self.lock:
                    self.associations += 1
                command, request, n = b"", None, 0
                while True:
                    pdu_type, body = self._pdu(conn)
                    if pdu_type == dimse.RELEASE_RQ:
                        conn.sendall(dimse.RELEASE_RP_PDU)
                        return
                    pos = 0
                    while pos < len(body):
                        length, context_id, header = dimse.PDV_HEAD.unpack_from(body, pos)
                        data = body[pos + 6:pos + 4 + length]
                        pos += 4 + length
                        if header & dimse.PDV_COMMAND:
                            command += data
                            if header & dimse.PDV_LAST:
                                request, command = dimse.parse_command(command), b""
                                with self.lock:
                                    n, self.count = self.count, self.count + 1
                                if self.answer(n) == "abort":
                                    conn.sendall(dimse.ABORT_PDU)
                                    return
                        elif header & dimse.PDV_LAST:
                            what = self.answer(n)
                            if what == "silent":
                                time.sleep(30)
                                return
                            if what == "big":
                                conn.sendall(dimse.PDU_HEAD.pack(dimse.P_DATA_TF, 0, MAX_PDU_RECEIVED + 1))
                                time.sleep(5)
                                return
                            with self.lock:
                                self.received.append(request.sop_instance_uid)
                            rsp = dimse.encode_response(request, what)
                            conn.sendall(dimse.p_data_pdu(context_id, rsp))
            except (ConnectionError, OSError):
                return

    def stop(self) -> None:
        self.server.close()


@pytest.fixture
def scripted():
    started = []

    def start(answer=lambda n: 0x0000) -> ScriptedSCP:
        started.append(ScriptedSCP(answer))
        return started[-1]

    yield start
    for scp in started:
        scp.stop()


def test_parallel_associations_share_the_files(scripted, tmp_path):
    series = make_series(tmp_path / "small", slices=200, size=8)
    scp = scripted()
    report = send_files(node_of(scp, max_associations=3), series.files)
    assert report.ok
    assert scp.associations == 3
    assert sorted(scp.received) == sorted(dcmread(p).SOPInstanceUID for p in series.files)  # each exactly once


def test_warnings_and_refusals_with_their_meaning(scripted, tmp_path):
    series = make_series(tmp_path / "ct", slices=4)
    scp = scripted(lambda n: [0x0000, 0xB000, 0xA700, 0xC000][n])
    report = send_files(node_of(scp), series.files)
    ok, warned, full, bad = report.results
    assert ok.accepted and ok.reason == ""
    assert warned.accepted and warned.warned and warned.status == 0xB000
    assert warned.reason == "Warning: coercion of data elements"
    assert full.status == 0xA700 and full.reason == "status 0xA700: Refused: out of resources"
    assert bad.status == 0xC000 and bad.reason == "status 0xC000: Error: cannot understand"
    assert report.accepted == [ok.path, warned.path] and report.warned == [warned]
    summary = report.summary()
    assert (summary["accepted"], summary["warned"], summary["refused"]) == (2, 1, 2)
    assert summary["warned_instances"] == [{"sop_instance_uid": warned.sop_instance_uid, "status": "0xB000"}]
    assert [i["status"] for i in summary["refused_instances"]] == ["0xA700", "0xC000"]
    assert str(tmp_path) not in json.dumps(summary)  # no file paths in what goes to XCom and logs


def test_abort_mid_send_gives_reasons(scripted, tmp_path):
    series = make_series(tmp_path / "ct", slices=5, size=512)
    scp = scripted(lambda n: "abort" if n == 2 else 0x0000)
    t0 = time.monotonic()
    report = send_files(node_of(scp, timeout=5), series.files)
    assert time.monotonic() - t0 < 5
    reasons = [r.reason for r in report.results]
    assert [r.accepted for r in report.results] == [True, True, False, False, False]
    assert "the node aborted the association (source: service provider" in reasons[2]
    assert "after 2 instances: not known whether the node stored it" in reasons[2]
    assert all(why.startswith("not sent: the association was lost (the node aborted") for why in reasons[3:])


def test_no_response_is_bounded_by_the_timeout(scripted, tmp_path):
    series = make_series(tmp_path / "ct", slices=3)
    scp = scripted(lambda n: "silent" if n == 1 else 0x0000)
    t0 = time.monotonic()
    report = send_files(node_of(scp, timeout=1), series.files)
    assert time.monotonic() - t0 < 3
    first, second, third = report.results
    assert first.accepted
    assert second.status is None and second.reason.startswith("no response from the node within 1 s")
    assert third.reason.startswith("not sent: the association was lost (no response")


def test_a_pdu_over_our_limit_aborts(scripted, tmp_path):
    series = make_series(tmp_path / "ct", slices=2)
    scp = scripted(lambda n: "big")
    report = send_files(node_of(scp, timeout=3), series.files)
    assert f"over the {MAX_PDU_RECEIVED} we accept" in report.results[0].reason


# -- conversion for a node that takes only uncompressed syntaxes --------------------------------

@pytest.mark.parametrize("name", ["JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm", "JPEGLSNearLossless_16.dcm"])
def test_compressed_files_are_converted_for_a_plain_storescp(storescp, name):
    pytest.importorskip("raddeploy_provider.dicom.transcode")
    source = Path(get_testdata_file(name))
    report = send_files(node_of(storescp), [source])
    assert report.ok, report.failed
    (result,) = report.results
    assert result.converted == EXPLICIT_VR_LE
    (received,) = storescp.files()
    got, original = dcmread(received), dcmread(source)
    assert got.file_meta.TransferSyntaxUID == EXPLICIT_VR_LE
    assert got.SOPInstanceUID == original.SOPInstanceUID
    assert (got.pixel_array == original.pixel_array).all()


def test_a_file_that_cannot_be_converted_fails_alone(storescp, tmp_path):
    pytest.importorskip("raddeploy_provider.dicom.transcode")
    ds = dcmread(make_series(tmp_path / "odd", slices=1).files[0])
    ds.file_meta.TransferSyntaxUID = "1.2.826.0.1.3680043.8.498.999.1"  # a syntax nobody knows
    odd = tmp_path / "odd.dcm"
    ds.save_as(odd, enforce_file_format=False)
    series = make_series(tmp_path / "ct", slices=2)
    report = send_files(node_of(storescp), [series.files[0], odd, series.files[1]])
    assert report.accepted == [str(series.files[0]), str(series.files[1])]
    reason = report.failed[str(odd)]
    assert reason.startswith("not sent: the node does not accept 1.2.826.0.1.3680043.8.498.999.1 and converting "
                             "to Explicit VR Little Endian failed: "), reason


def test_an_implicit_only_node_gets_explicit_files_converted(tmp_path):
    pytest.importorskip("raddeploy_provider.dicom.transcode")
    series = make_series(tmp_path / "ct", slices=2, size=128)
    scp = StoreSCP(tmp_path / "out", extra_args=("+xi",))  # accepts Implicit VR Little Endian only
    try:
        report = send_files(node_of(scp), series.files)
    finally:
        scp.stop()
    assert report.ok, report.failed
    assert all(r.converted == IMPLICIT_VR_LE for r in report.results)
    received = {dcmread(p).SOPInstanceUID: dcmread(p) for p in scp.files()}
    for path in series.files:
        original = dcmread(path)
        got = received[original.SOPInstanceUID]
        assert got.file_meta.TransferSyntaxUID == IMPLICIT_VR_LE
        assert got.PixelData == original.PixelData and got.PatientID == original.PatientID
