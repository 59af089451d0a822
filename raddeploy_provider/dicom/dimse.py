"""The DICOM wire encodings, both directions: upper-layer PDUs (PS3.8 9.3) and DIMSE (PS3.7).

What flows per message is done directly on bytes: PDU and PDV headers, the command sets of
C-STORE and C-ECHO (a handful of Implicit VR Little Endian elements each, PS3.7 Annex E), the
fixed PDUs (A-RELEASE-RP, A-ABORT, A-ASSOCIATE-RJ), and the File Meta Information written in
front of a received data set (PS3.10 7.1). Not building pydicom datasets for these is most of
what makes a receive path lean. The A-ASSOCIATE-RQ and -AC, with their variable items and
once per association, go through pynetdicom's PDU classes. The DIMSE statuses are named here
too (PS3.4 B.2.3, PS3.7 Annex C), for both the SCP's answers and an SCU's reading of them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from pydicom.uid import generate_uid
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import PresentationContext

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"  # the DICOM application context name (PS3.7 A.2.1)
VERIFICATION = "1.2.840.10008.1.1"  # the Verification SOP class: C-ECHO (PS3.4 A.4)

#: Deterministic, under pydicom's UID root (which exists for exactly this use).
IMPLEMENTATION_CLASS_UID = str(generate_uid(entropy_srcs=["raddeploy-provider implementation class"]))
IMPLEMENTATION_VERSION = "RADDEPLOY_01"


# -- upper layer (PS3.8 9.3) ---------------------------------------------------------------

# PDU types (PS3.8 Table 9-11); plain ints, as a receive loop compares one per PDU. The
# A-ASSOCIATE-AC (0x02) is pynetdicom's to encode.
ASSOCIATE_RQ = 0x01
ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
RELEASE_RQ = 0x05
RELEASE_RP = 0x06
ABORT = 0x07

PDU_HEAD = struct.Struct(">BBI")  # PDU type, reserved, length of what follows
PDV_HEAD = struct.Struct(">IBB")  # item length (from the context ID on), presentation context ID, header
PDV_COMMAND = 0x01  # PDV header bit: a command fragment (else a data set fragment)
PDV_LAST = 0x02  # PDV header bit: the last fragment of the command or data set

_ABORT_BY_PROVIDER = 0x02  # A-ABORT source: the service provider (reason 0: not specified)
RELEASE_RP_PDU = PDU_HEAD.pack(RELEASE_RP, 0, 4) + bytes(4)
ABORT_PDU = PDU_HEAD.pack(ABORT, 0, 4) + bytes((0, 0, _ABORT_BY_PROVIDER, 0))

# A-ASSOCIATE-RJ result, source and diagnostic (PS3.8 Table 9-21); a diagnostic's meaning
# depends on the source.
REJECTED_PERMANENT = 0x01
REJECTED_TRANSIENT = 0x02  # the requestor may try again later
SOURCE_SERVICE_USER = 0x01
SOURCE_PROVIDER_PRESENTATION = 0x03
USER_NO_REASON = 0x01
USER_CALLING_AE_NOT_RECOGNIZED = 0x03
USER_CALLED_AE_NOT_RECOGNIZED = 0x07
PROVIDER_LOCAL_LIMIT_EXCEEDED = 0x02
_RJ_BODY = struct.Struct(">BBBB")  # reserved, result, source, diagnostic

ACCEPTANCE = 0x00  # a presentation context's result in an A-ASSOCIATE-AC: accepted (PS3.8 9.3.3.2)


def decode_associate_rq(body: bytes | memoryview) -> A_ASSOCIATE:
    """The A-ASSOCIATE-RQ whose PDU body (after the 6-byte header) is ``body``."""
    rq = A_ASSOCIATE_RQ()
    rq.decode(PDU_HEAD.pack(ASSOCIATE_RQ, 0, len(body)) + bytes(body))
    return rq.to_primitive()


def associate_ac(called_ae: str, calling_ae: str, results: list[PresentationContext],
                 max_pdu_length: int) -> bytes:
    """The A-ASSOCIATE-AC PDU (PS3.8 9.3.3): the AE titles as requested, the presentation
    contexts' negotiated ``results``, our maximum PDU length, implementation class and version."""
    accept = A_ASSOCIATE()
    accept.application_context_name = APPLICATION_CONTEXT
    accept.calling_ae_title = calling_ae
    accept.called_ae_title = called_ae
    accept.presentation_context_definition_results_list = results
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu_length
    impl_uid = ImplementationClassUIDNotification()
    impl_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    impl_name = ImplementationVersionNameNotification()
    impl_name.implementation_version_name = IMPLEMENTATION_VERSION
    accept.user_information = [max_length, impl_uid, impl_name]
    ac = A_ASSOCIATE_AC()
    ac.from_primitive(accept)
    return ac.encode()


def associate_rj(result: int, source: int, diagnostic: int) -> bytes:
    """The A-ASSOCIATE-RJ PDU (PS3.8 9.3.4)."""
    return PDU_HEAD.pack(ASSOCIATE_RJ, 0, _RJ_BODY.size) + _RJ_BODY.pack(0, result, source, diagnostic)


def p_data_pdu(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF PDU with the whole command set as its last fragment (responses are small)."""
    pdv = PDV_HEAD.pack(len(command) + 2, context_id, PDV_COMMAND | PDV_LAST) + command
    return PDU_HEAD.pack(P_DATA_TF, 0, len(pdv)) + pdv


# -- DIMSE (PS3.7) -------------------------------------------------------------------------

class Status(IntEnum):
    """The DIMSE statuses the listener answers with (PS3.4 Table B.2-1, PS3.7 Annex C)."""

    SUCCESS = 0x0000  # Success: the instance is stored (the sender may let it go)
    OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources, it cannot be stored now (the sender retries)
    CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand, the data set is not valid (retrying won't help)


WARNING = range(0xB000, 0xC000)  # C-STORE warnings: stored, but coerced, trimmed or of another class


def store_accepted(status: int) -> bool:
    """Whether a C-STORE response's status means the instance was stored: success or a warning."""
    return status == Status.SUCCESS or status in WARNING


# Command Field values (PS3.7 E.1)
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
NO_DATASET = 0x0101

_TAG_LEN = struct.Struct("<HHI")


@dataclass(frozen=True)
class Command:
    """The fields of a request command set the SCP acts on."""

    command_field: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    has_dataset: bool


def _uid(raw: bytes) -> str:
    return raw.rstrip(b"\x00 ").decode("ascii", "replace")


def parse_command(raw: bytes) -> Command:
    """Decode an Implicit VR Little Endian command set; raises ValueError when malformed."""
    values: dict[int, bytes] = {}
    pos, end = 0, len(raw)
    while pos + 8 <= end:
        group, element, length = _TAG_LEN.unpack_from(raw, pos)
        pos += 8
        if group != 0x0000 or pos + length > end:
            raise ValueError("malformed command set")
        values[element] = raw[pos:pos + length]
        pos += length
    try:
        field = struct.unpack("<H", values[0x0100])[0]
        data_set_type = struct.unpack("<H", values[0x0800])[0]
        message_id = struct.unpack("<H", values.get(0x0110, b"\x00\x00"))[0]
    except (KeyError, struct.error):
        raise ValueError("command set lacks CommandField, CommandDataSetType or MessageID") from None
    # C-ECHO-RQ carries the class in AffectedSOPClassUID (0000,0002); C-STORE both UIDs.
    return Command(field, message_id, _uid(values.get(0x0002, b"")), _uid(values.get(0x1000, b"")),
                   data_set_type != NO_DATASET)


def _element(element: int, value: bytes) -> bytes:
    return _TAG_LEN.pack(0x0000, element, len(value)) + value


def _uid_value(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_response(request: Command, status: int) -> bytes:
    """The response command set (C-STORE-RSP or C-ECHO-RSP) for ``request``."""
    field = C_STORE_RSP if request.command_field == C_STORE_RQ else C_ECHO_RSP
    body = _element(0x0002, _uid_value(request.sop_class_uid))
    body += _element(0x0100, struct.pack("<H", field))
    body += _element(0x0120, struct.pack("<H", request.message_id))
    body += _element(0x0800, struct.pack("<H", NO_DATASET))
    body += _element(0x0900, struct.pack("<H", status))
    if request.command_field == C_STORE_RQ:
        body += _element(0x1000, _uid_value(request.sop_instance_uid))
    return _element(0x0000, struct.pack("<I", len(body))) + body


# -- DICOM files (PS3.10) ------------------------------------------------------------------

def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group (Explicit VR Little Endian)."""

    def explicit(element: int, vr: bytes, value: bytes) -> bytes:
        if vr == b"OB":
            return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
        return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value

    version = IMPLEMENTATION_VERSION.encode("ascii")
    body = (explicit(0x0001, b"OB", b"\x00\x01")
            + explicit(0x0002, b"UI", _uid_value(sop_class_uid))
            + explicit(0x0003, b"UI", _uid_value(sop_instance_uid))
            + explicit(0x0010, b"UI", _uid_value(transfer_syntax))
            + explicit(0x0012, b"UI", _uid_value(IMPLEMENTATION_CLASS_UID))
            + explicit(0x0013, b"SH", version + (b" " if len(version) % 2 else b"")))
    return b"\x00" * 128 + b"DICM" + explicit(0x0000, b"UL", struct.pack("<I", len(body))) + body
