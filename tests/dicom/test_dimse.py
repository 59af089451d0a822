"""The wire encodings, checked against independent decoders: pydicom for command sets and the
File Meta Information, pynetdicom's PDU classes for the upper-layer PDUs. No network."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from pynetdicom.pdu import (
    A_ABORT_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ASSOCIATE_RQ, A_RELEASE_RP, A_RELEASE_RQ, P_DATA_TF)
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationVersionNameNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context, negotiate_as_acceptor

from raddeploy_provider.dicom import dimse
from raddeploy_provider.dicom.dimse import Status

assert len(CTImageStorage) % 2  # odd: its value is padded with a NUL on the wire


def implicit_le(ds: Dataset) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, True
    write_dataset(fp, ds)
    return fp.getvalue()


def read_implicit_le(raw: bytes) -> Dataset:
    return read_dataset(BytesIO(raw), is_implicit_VR=True, is_little_endian=True)


# -- command sets ------------------------------------------------------------------------

def store_rq(message_id: int, sop_instance_uid: str) -> bytes:
    """A C-STORE-RQ command set as pydicom encodes it."""
    ds = Dataset()
    ds.AffectedSOPClassUID = CTImageStorage
    ds.CommandField = dimse.C_STORE_RQ
    ds.MessageID = message_id
    ds.Priority = 0
    ds.CommandDataSetType = 0x0000  # a data set follows
    ds.AffectedSOPInstanceUID = sop_instance_uid
    body = implicit_le(ds)
    group = Dataset()
    group.CommandGroupLength = len(body)
    return implicit_le(group) + body


def test_c_store_command_round_trip():
    uid = generate_uid()
    request = dimse.parse_command(store_rq(7, uid))
    assert request == dimse.Command(dimse.C_STORE_RQ, 7, CTImageStorage, uid, True)
    raw = dimse.encode_response(request, Status.OUT_OF_RESOURCES)
    rsp = read_implicit_le(raw)
    assert rsp.CommandGroupLength == len(raw) - 12  # the group length element is 12 bytes
    assert rsp.CommandField == dimse.C_STORE_RSP == 0x8001
    assert rsp.MessageIDBeingRespondedTo == 7
    assert rsp.AffectedSOPClassUID == CTImageStorage and rsp.AffectedSOPInstanceUID == uid
    assert rsp.CommandDataSetType == dimse.NO_DATASET == 0x0101
    assert rsp.Status == 0xA700
    assert dimse.parse_command(raw).command_field == dimse.C_STORE_RSP  # it parses its own too


def test_c_echo_response_has_no_instance():
    ds = Dataset()
    ds.AffectedSOPClassUID = dimse.VERIFICATION
    ds.CommandField = dimse.C_ECHO_RQ
    ds.MessageID = 3
    ds.CommandDataSetType = dimse.NO_DATASET
    request = dimse.parse_command(implicit_le(ds))
    assert request == dimse.Command(dimse.C_ECHO_RQ, 3, dimse.VERIFICATION, "", False)
    rsp = read_implicit_le(dimse.encode_response(request, Status.SUCCESS))
    assert rsp.CommandField == dimse.C_ECHO_RSP == 0x8030 and rsp.Status == 0
    assert rsp.MessageIDBeingRespondedTo == 3 and rsp.AffectedSOPClassUID == "1.2.840.10008.1.1"
    assert "AffectedSOPInstanceUID" not in rsp


@pytest.mark.parametrize("raw", [b"\x08\x00\x05\x00\x02\x00\x00\x00AB",  # not group 0000
                                 store_rq(1, "1.2.3")[:-3],  # cut short
                                 b""], ids=["other group", "truncated", "empty"])
def test_malformed_command_sets_raise_value_error(raw):
    with pytest.raises(ValueError):
        dimse.parse_command(raw)


def test_response_in_a_p_data_pdu():
    command = dimse.encode_response(dimse.Command(dimse.C_ECHO_RQ, 1, dimse.VERIFICATION, "", False), Status.SUCCESS)
    pdu = P_DATA_TF()
    pdu.decode(dimse.p_data_pdu(5, command))
    (pdv,) = pdu.presentation_data_value_items
    assert pdv.context_id == 5
    assert pdv.data[0] == 0x03 and pdv.data[1:] == command  # header: command, last fragment


# -- statuses ----------------------------------------------------------------------------

@pytest.mark.parametrize("status, accepted", [(0x0000, True), (0xB000, True), (0xB007, True), (0xBFFF, True),
                                              (0xA700, False), (0xA900, False), (0xC000, False), (0x0001, False)])
def test_store_accepted_is_success_or_warning(status, accepted):
    assert dimse.store_accepted(status) is accepted


def test_status_values():
    assert (Status.SUCCESS, Status.OUT_OF_RESOURCES, Status.CANNOT_UNDERSTAND) == (0x0000, 0xA700, 0xC000)


# -- association PDUs ---------------------------------------------------------------------

def associate_rq_pdu() -> bytes:
    """An A-ASSOCIATE-RQ as pynetdicom encodes it: CT in JPEG 2000, and Verification."""
    request = A_ASSOCIATE()
    request.application_context_name = dimse.APPLICATION_CONTEXT
    request.calling_ae_title, request.called_ae_title = "STORESCU", "RADDEPLOY"
    contexts = [build_context(CTImageStorage, [JPEG2000Lossless]), build_context(dimse.VERIFICATION)]
    for context_id, cx in zip((1, 3), contexts):
        cx.context_id = context_id
    request.presentation_context_definition_list = contexts
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16384
    request.user_information = [max_length]
    return A_ASSOCIATE_RQ(request).encode()


def test_associate_rq_decoded_from_its_body():
    request = dimse.decode_associate_rq(memoryview(associate_rq_pdu())[6:])
    assert (request.calling_ae_title, request.called_ae_title) == ("STORESCU", "RADDEPLOY")
    assert request.application_context_name == dimse.APPLICATION_CONTEXT
    assert request.maximum_length_received == 16384
    assert [cx.context_id for cx in request.presentation_context_definition_list] == [1, 3]


def test_associate_ac_decoded_by_pynetdicom():
    request = dimse.decode_associate_rq(memoryview(associate_rq_pdu())[6:])
    supported = [build_context(dimse.VERIFICATION), build_context(CTImageStorage, [ExplicitVRLittleEndian])]
    results, _ = negotiate_as_acceptor(request.presentation_context_definition_list, supported)
    ac = A_ASSOCIATE_AC()
    ac.decode(dimse.associate_ac(request.called_ae_title, request.calling_ae_title, results, 1 << 20))
    accept = ac.to_primitive()
    assert (accept.called_ae_title, accept.calling_ae_title) == ("RADDEPLOY", "STORESCU")
    assert accept.application_context_name == dimse.APPLICATION_CONTEXT
    assert accept.maximum_length_received == 1 << 20
    assert accept.implementation_class_uid == dimse.IMPLEMENTATION_CLASS_UID
    (version,) = [item for item in accept.user_information if isinstance(item, ImplementationVersionNameNotification)]
    assert version.implementation_version_name == dimse.IMPLEMENTATION_VERSION
    outcome = {cx.context_id: (cx.result, cx.transfer_syntax[0] if cx.result == 0 else None)
               for cx in accept.presentation_context_definition_results_list}
    # CT in JPEG 2000 only: transfer syntax not supported (0x04); Verification accepted.
    assert outcome == {1: (0x04, None), 3: (0x00, "1.2.840.10008.1.2")}


@pytest.mark.parametrize("values", [(0x01, 0x01, 0x07), (0x01, 0x01, 0x03), (0x02, 0x03, 0x02)])
def test_associate_rj_decoded_by_pynetdicom(values):
    rj = A_ASSOCIATE_RJ()
    rj.decode(dimse.associate_rj(*values))
    assert (rj.result, rj.source, rj.reason_diagnostic) == values


def test_release_rp_and_abort_decoded_by_pynetdicom():
    rp = A_RELEASE_RP()
    rp.decode(dimse.RELEASE_RP_PDU)
    assert rp.pdu_type == 0x06
    abort = A_ABORT_RQ()
    abort.decode(dimse.ABORT_PDU)
    assert (abort.source, abort.reason_diagnostic) == (0x02, 0x00)  # service provider, reason not specified


# -- the file's meta header ----------------------------------------------------------------

def test_file_meta_read_back_by_pydicom():
    uid = generate_uid()
    ds = Dataset()
    ds.PatientID = "P1"
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    meta = dimse.file_meta(CTImageStorage, uid, ExplicitVRLittleEndian)
    assert meta[:128] == bytes(128) and meta[128:132] == b"DICM"
    read = dcmread(BytesIO(meta + fp.getvalue()))
    fm = read.file_meta
    assert fm.FileMetaInformationVersion == b"\x00\x01"
    assert fm.MediaStorageSOPClassUID == CTImageStorage and fm.MediaStorageSOPInstanceUID == uid
    assert fm.TransferSyntaxUID == ExplicitVRLittleEndian
    assert fm.ImplementationClassUID == dimse.IMPLEMENTATION_CLASS_UID
    assert fm.ImplementationVersionName == dimse.IMPLEMENTATION_VERSION
    assert fm.FileMetaInformationGroupLength == len(meta) - 144  # after preamble, DICM and the length element
    assert read.PatientID == "P1"


# -- the requestor's side (the sender, dicom/scu.py) ----------------------------------------

def test_associate_rq_decoded_by_pynetdicom():
    contexts = []
    uncompressed = [ExplicitVRLittleEndian, "1.2.840.10008.1.2"]
    for context_id, (abstract, syntaxes) in zip((1, 3), [(CTImageStorage, [JPEG2000Lossless]),
                                                         (CTImageStorage, uncompressed)]):
        cx = build_context(abstract, syntaxes)
        cx.context_id = context_id
        contexts.append(cx)
    raw = dimse.associate_rq("STORESCP", "RADDEPLOY", contexts, 1 << 20)
    rq = A_ASSOCIATE_RQ()
    rq.decode(raw)
    request = rq.to_primitive()
    assert (request.called_ae_title, request.calling_ae_title) == ("STORESCP", "RADDEPLOY")
    assert request.application_context_name == dimse.APPLICATION_CONTEXT
    assert request.maximum_length_received == 1 << 20
    assert request.implementation_class_uid == dimse.IMPLEMENTATION_CLASS_UID
    proposed = {cx.context_id: (cx.abstract_syntax, cx.transfer_syntax)
                for cx in request.presentation_context_definition_list}
    assert proposed == {1: (CTImageStorage, [JPEG2000Lossless]), 3: (CTImageStorage, uncompressed)}
    # the listener's own decoder reads it the same
    assert dimse.decode_associate_rq(memoryview(raw)[6:]).maximum_length_received == 1 << 20


def test_associate_ac_decoded():
    request = dimse.decode_associate_rq(memoryview(associate_rq_pdu())[6:])
    results, _ = negotiate_as_acceptor(request.presentation_context_definition_list,
                                       [build_context(dimse.VERIFICATION)])
    raw = dimse.associate_ac(request.called_ae_title, request.calling_ae_title, results, 16384)
    accept = dimse.decode_associate_ac(memoryview(raw)[6:])
    assert accept.maximum_length_received == 16384
    outcome = {cx.context_id: (cx.result, list(cx.transfer_syntax))
               for cx in accept.presentation_context_definition_results_list}
    assert outcome[3] == (0x00, ["1.2.840.10008.1.2"])
    assert outcome[1][0] == 0x03  # CT not supported at all: abstract syntax not supported


@pytest.mark.parametrize("values, words", [((0x01, 0x01, 0x07), "called AE title not recognized (permanent)"),
                                           ((0x01, 0x01, 0x03), "calling AE title not recognized (permanent)"),
                                           ((0x02, 0x03, 0x02),
                                            "local limit exceeded (too many associations) (transient)"),
                                           ((0x01, 0x02, 0x02), "protocol version not supported (permanent)"),
                                           ((0x01, 0x01, 0x09), "source 1, reason 9 (permanent)")])
def test_associate_rj_in_words(values, words):
    rejection = dimse.decode_associate_rj(memoryview(dimse.associate_rj(*values))[6:])
    assert (rejection.result, rejection.source, rejection.diagnostic) == values
    assert str(rejection) == words
    assert rejection.transient is (values[0] == 0x02)


def test_abort_in_words_and_requestor_pdus_decoded_by_pynetdicom():
    provider = dimse.decode_abort(memoryview(dimse.ABORT_PDU)[6:])
    assert str(provider) == "(source: service provider, reason not specified)"
    assert str(dimse.decode_abort(bytes((0, 0, 2, 2)))) == "(source: service provider, unexpected PDU)"
    assert str(dimse.decode_abort(memoryview(dimse.USER_ABORT_PDU)[6:])) == "(source: service user)"
    abort = A_ABORT_RQ()
    abort.decode(dimse.USER_ABORT_PDU)
    assert abort.source == 0x00
    rq = A_RELEASE_RQ()
    rq.decode(dimse.RELEASE_RQ_PDU)
    assert rq.pdu_type == 0x05


def test_store_rq_read_by_pydicom_and_by_the_listener():
    uid = generate_uid()
    raw = dimse.encode_store_rq(9, CTImageStorage, uid)
    ds = read_implicit_le(raw)
    assert ds.CommandGroupLength == len(raw) - 12
    assert (ds.CommandField, ds.MessageID, ds.Priority, ds.CommandDataSetType) == (0x0001, 9, 0, 0x0000)
    assert ds.AffectedSOPClassUID == CTImageStorage and ds.AffectedSOPInstanceUID == uid
    assert raw == store_rq(9, uid)  # byte for byte what pydicom encodes
    assert dimse.parse_command(raw) == dimse.Command(dimse.C_STORE_RQ, 9, CTImageStorage, uid, True)


def test_echo_rq_read_by_the_listener():
    request = dimse.parse_command(dimse.encode_echo_rq(65535))
    assert request == dimse.Command(dimse.C_ECHO_RQ, 65535, dimse.VERIFICATION, "", False)


def test_response_parsed_with_error_comment():
    uid = generate_uid()
    ours = dimse.parse_response(dimse.encode_response(dimse.Command(dimse.C_STORE_RQ, 12, CTImageStorage, uid, True),
                                                      Status.OUT_OF_RESOURCES))
    assert ours == dimse.Response(dimse.C_STORE_RSP, 12, 0xA700, "", uid)
    ds = Dataset()
    ds.AffectedSOPClassUID = CTImageStorage
    ds.CommandField = dimse.C_STORE_RSP
    ds.MessageIDBeingRespondedTo = 4
    ds.CommandDataSetType = dimse.NO_DATASET
    ds.Status = 0xC000
    ds.ErrorComment = "Bad pixel data"
    ds.AffectedSOPInstanceUID = uid
    assert dimse.parse_response(implicit_le(ds)) == dimse.Response(dimse.C_STORE_RSP, 4, 0xC000, "Bad pixel data", uid)
    with pytest.raises(ValueError):
        dimse.parse_response(store_rq(1, uid))  # a request: no status


@pytest.mark.parametrize("status, words", [(0x0000, "Success"), (0xA701, "Refused: out of resources"),
                                           (0xA900, "Error: data set does not match SOP class"),
                                           (0xC123, "Error: cannot understand"),
                                           (0x0122, "Refused: SOP class not supported"),
                                           (0xB000, "Warning: coercion of data elements"), (0xB123, "Warning"),
                                           (0x0272, "Failure")])
def test_status_meaning(status, words):
    assert dimse.status_meaning(status) == words


def test_one_pdv_header_decoded_by_pynetdicom():
    data = b"\x08\x00" * 10
    raw = dimse.P_DATA_ONE_PDV.pack(dimse.P_DATA_TF, 0, len(data) + 6, len(data) + 2, 7, dimse.PDV_LAST) + data
    pdu = P_DATA_TF()
    pdu.decode(raw)
    (pdv,) = pdu.presentation_data_value_items
    assert pdv.context_id == 7 and pdv.data == b"\x02" + data  # a data set fragment, the last


@pytest.mark.parametrize("name", ["CT_small.dcm", "JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm", "rtplan.dcm"])
def test_read_file_meta_agrees_with_pydicom(name):
    from pydicom.data import get_testdata_file

    raw = open(get_testdata_file(name), "rb").read()
    meta = dimse.read_file_meta(raw)
    ds = dcmread(BytesIO(raw))
    fm = ds.file_meta
    assert (meta.sop_class_uid, meta.sop_instance_uid, meta.transfer_syntax) == (
        fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID, fm.TransferSyntaxUID)
    rest = read_dataset(BytesIO(raw[meta.dataset_offset:]), is_implicit_VR=fm.TransferSyntaxUID.is_implicit_VR,
                        is_little_endian=fm.TransferSyntaxUID.is_little_endian)
    assert rest.SOPInstanceUID == ds.SOPInstanceUID and len(rest) == len(ds)
    with pytest.raises(dimse.IncompleteMeta) as short:
        dimse.read_file_meta(raw[:200])
    assert short.value.needed > 200


@pytest.mark.parametrize("raw, words", [(b"\x00" * 128 + b"DIXM" + b"\x00" * 20, "no DICM prefix"),
                                        (dimse.file_meta(CTImageStorage, "1.2.3", ExplicitVRLittleEndian)[:154],
                                         "cut short"),
                                        (b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00\x10\x00\x00\x00"
                                         + b"\x08\x00" * 8, "not in Explicit VR")],
                         ids=["no DICM", "cut short", "implicit VR meta"])
def test_read_file_meta_refuses_what_is_not_part10(raw, words):
    with pytest.raises(ValueError, match=words):
        dimse.read_file_meta(raw)


def test_read_file_meta_needs_the_uids():
    meta = dimse.file_meta(CTImageStorage, "1.2.3", ExplicitVRLittleEndian)
    # drop MediaStorageSOPInstanceUID (0002,0003): a file we could not name in the C-STORE-RQ
    pos = meta.index(b"\x02\x00\x03\x00UI")
    length = int.from_bytes(meta[pos + 6:pos + 8], "little")
    broken = meta[:pos] + meta[pos + 8 + length:] + b"\x08\x00\x05\x00CS\x00\x00"
    with pytest.raises(ValueError, match="lacks MediaStorageSOPInstanceUID"):
        dimse.read_file_meta(broken)
