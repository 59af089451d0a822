"""The DICOM wire encodings, both directions: upper-layer PDUs (PS3.8 9.3) and DIMSE (PS3.7).

What flows per message is done directly on bytes: PDU and PDV headers, the command sets of
C-STORE and C-ECHO, requests and responses (a handful of Implicit VR Little Endian elements
each, PS3.7 Annex E), the fixed PDUs (A-RELEASE-RQ/RP, A-ABORT, A-ASSOCIATE-RJ), and the File
Meta Information, written in front of a received data set and read from a file to send
(PS3.10 7.1). Not building pydicom datasets for these is most of what makes the listener's
receive path and the sender (``scu``) lean. The A-ASSOCIATE-RQ and -AC, with their variable
items and once per association, go through pynetdicom's PDU classes. The DIMSE statuses are
named here too (PS3.4 B.2.3, PS3.7 Annex C), for both the SCP's answers and an SCU's reading
of them, and so are the reasons an association is rejected or aborted, in words.
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
# A-ASSOCIATE-RQ and -AC bodies are pynetdicom's to encode and decode.
ASSOCIATE_RQ = 0x01
ASSOCIATE_AC = 0x02
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


#: The fixed fields of an A-ASSOCIATE-RQ/AC body, before its variable items (PS3.8 9.3.2):
#: protocol version, reserved, called and calling AE titles, 32 reserved bytes.
_ASSOCIATE_FIXED = 68


class MalformedPDU(ValueError):
    """A PDU whose body cannot be decoded (its items overrun it, a value is garbage, ...)."""


def decode_associate_rq(body: bytes | memoryview) -> A_ASSOCIATE:
    """The A-ASSOCIATE-RQ whose PDU body (after the 6-byte header) is ``body``; raises
    MalformedPDU (a ValueError) whatever pynetdicom's decoder trips on (it asserts, indexes
    past the end, unpacks short buffers: an item longer than its PDU is any of these)."""
    if len(body) < _ASSOCIATE_FIXED:
        raise MalformedPDU(f"A-ASSOCIATE-RQ of {len(body)} bytes, shorter than its fixed fields")
    rq = A_ASSOCIATE_RQ()
    try:
        rq.decode(PDU_HEAD.pack(ASSOCIATE_RQ, 0, len(body)) + bytes(body))
        return rq.to_primitive()
    except Exception as exc:  # noqa: BLE001 - the peer's bytes, not our bug: a clean abort
        raise MalformedPDU(f"malformed A-ASSOCIATE-RQ ({type(exc).__name__}: {exc})"[:300]) from None


def _associate(called_ae: str, calling_ae: str, max_pdu_length: int) -> A_ASSOCIATE:
    """An A-ASSOCIATE primitive, either way: AE titles, the DICOM application context, the
    largest PDU we accept, our implementation class and version."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = APPLICATION_CONTEXT
    primitive.calling_ae_title = calling_ae
    primitive.called_ae_title = called_ae
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = max_pdu_length
    impl_uid = ImplementationClassUIDNotification()
    impl_uid.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    impl_name = ImplementationVersionNameNotification()
    impl_name.implementation_version_name = IMPLEMENTATION_VERSION
    primitive.user_information = [max_length, impl_uid, impl_name]
    return primitive


def associate_ac(called_ae: str, calling_ae: str, results: list[PresentationContext],
                 max_pdu_length: int) -> bytes:
    """The A-ASSOCIATE-AC PDU (PS3.8 9.3.3): the AE titles as requested, the presentation
    contexts' negotiated ``results``, our maximum PDU length, implementation class and version."""
    accept = _associate(called_ae, calling_ae, max_pdu_length)
    accept.presentation_context_definition_results_list = results
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


# -- the requestor's side: what an SCU sends and reads once per association -----------------

RELEASE_RQ_PDU = PDU_HEAD.pack(RELEASE_RQ, 0, 4) + bytes(4)
USER_ABORT_PDU = PDU_HEAD.pack(ABORT, 0, 4) + bytes(4)  # A-ABORT, source: the service user
#: A P-DATA-TF PDU holding exactly one PDV: both headers at once (PDU type, reserved, PDU
#: length; PDV item length, presentation context ID, header). A data fragment of n bytes
#: packs as (P_DATA_TF, 0, n + 6, n + 2, context, flags).
P_DATA_ONE_PDV = struct.Struct(">BBIIBB")


def associate_rq(called_ae: str, calling_ae: str, contexts: list[PresentationContext],
                 max_pdu_length: int) -> bytes:
    """The A-ASSOCIATE-RQ PDU (PS3.8 9.3.2): ``contexts`` (each with its odd context ID), the
    largest PDU we accept, our implementation class and version."""
    request = _associate(called_ae, calling_ae, max_pdu_length)
    request.presentation_context_definition_list = contexts
    return A_ASSOCIATE_RQ(request).encode()


def decode_associate_ac(body: bytes | memoryview) -> A_ASSOCIATE:
    """The A-ASSOCIATE-AC whose PDU body (after the 6-byte header) is ``body``: its
    ``presentation_context_definition_results_list`` (matched to the request by context ID)
    and ``maximum_length_received`` (0: no limit)."""
    ac = A_ASSOCIATE_AC()
    ac.decode(PDU_HEAD.pack(ASSOCIATE_AC, 0, len(body)) + bytes(body))
    return ac.to_primitive()


_RJ_REASONS = {  # (source, diagnostic) -> the reason in words (PS3.8 Table 9-21)
    (SOURCE_SERVICE_USER, USER_NO_REASON): "no reason given",
    (SOURCE_SERVICE_USER, 0x02): "application context name not supported",
    (SOURCE_SERVICE_USER, USER_CALLING_AE_NOT_RECOGNIZED): "calling AE title not recognized",
    (SOURCE_SERVICE_USER, USER_CALLED_AE_NOT_RECOGNIZED): "called AE title not recognized",
    (0x02, 0x01): "no reason given (ACSE)",
    (0x02, 0x02): "protocol version not supported",
    (SOURCE_PROVIDER_PRESENTATION, 0x01): "temporary congestion",
    (SOURCE_PROVIDER_PRESENTATION, PROVIDER_LOCAL_LIMIT_EXCEEDED): "local limit exceeded (too many associations)",
}


@dataclass(frozen=True)
class Rejection:
    """A decoded A-ASSOCIATE-RJ; ``str()`` is its reason in words."""

    result: int
    source: int
    diagnostic: int

    @property
    def transient(self) -> bool:
        return self.result == REJECTED_TRANSIENT

    def __str__(self) -> str:
        why = _RJ_REASONS.get((self.source, self.diagnostic), f"source {self.source}, reason {self.diagnostic}")
        return f"{why} ({'transient' if self.transient else 'permanent'})"


def decode_associate_rj(body: bytes | memoryview) -> Rejection:
    """The A-ASSOCIATE-RJ whose PDU body is ``body``."""
    _, result, source, diagnostic = _RJ_BODY.unpack_from(body)
    return Rejection(result, source, diagnostic)


_ABORT_REASONS = {0: "reason not specified", 1: "unrecognized PDU", 2: "unexpected PDU",
                  4: "unrecognized PDU parameter", 5: "unexpected PDU parameter", 6: "invalid PDU parameter value"}


@dataclass(frozen=True)
class Abort:
    """A decoded A-ABORT (PS3.8 9.3.8); ``str()`` says who aborted and why."""

    source: int
    reason: int

    def __str__(self) -> str:
        if self.source == _ABORT_BY_PROVIDER:
            return f"(source: service provider, {_ABORT_REASONS.get(self.reason, f'reason {self.reason}')})"
        return "(source: service user)"


def decode_abort(body: bytes | memoryview) -> Abort:
    """The A-ABORT whose PDU body is ``body`` (4 bytes: reserved, reserved, source, reason)."""
    return Abort(body[2], body[3]) if len(body) >= 4 else Abort(0, 0)


# -- DIMSE (PS3.7) -------------------------------------------------------------------------

class Status(IntEnum):
    """The DIMSE statuses the listener answers with (PS3.4 Table B.2-1, PS3.7 Annex C)."""

    SUCCESS = 0x0000  # Success: the instance is stored (the sender may let it go)
    OUT_OF_RESOURCES = 0xA700  # Refused: Out of Resources, it cannot be stored now (the sender retries)
    # Error: Data Set does not match SOP Class. DCMTK 3.6.7's storescp answers it too when the
    # data set's SOP Instance UID is not the request's Affected SOP Instance UID (measured).
    DATA_SET_MISMATCH = 0xA900
    SOP_CLASS_NOT_SUPPORTED = 0x0122  # Refused: the request's SOP class is not its presentation context's
    CANNOT_UNDERSTAND = 0xC000  # Error: Cannot understand, the data set is not valid (retrying won't help)
    # An instance of another patient than its study's: an error of the "cannot understand" range
    # (C000-CFFF), so senders take it as permanent, with a code of its own for the PACS admin.
    OTHER_PATIENT = 0xC001


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


def _command_elements(raw: bytes) -> dict[int, bytes]:
    """The elements of an Implicit VR Little Endian command set, by element number."""
    values: dict[int, bytes] = {}
    pos, end = 0, len(raw)
    while pos + 8 <= end:
        group, element, length = _TAG_LEN.unpack_from(raw, pos)
        pos += 8
        if group != 0x0000 or pos + length > end:
            raise ValueError("malformed command set")
        values[element] = raw[pos:pos + length]
        pos += length
    return values


def parse_command(raw: bytes) -> Command:
    """Decode an Implicit VR Little Endian command set; raises ValueError when malformed."""
    values = _command_elements(raw)
    try:
        field = struct.unpack("<H", values[0x0100])[0]
        data_set_type = struct.unpack("<H", values[0x0800])[0]
        message_id = struct.unpack("<H", values.get(0x0110, b"\x00\x00"))[0]
    except (KeyError, struct.error):
        raise ValueError("command set lacks CommandField, CommandDataSetType or MessageID") from None
    # C-ECHO-RQ carries the class in AffectedSOPClassUID (0000,0002); C-STORE both UIDs.
    sop_class, sop_instance = _uid(values.get(0x0002, b"")), _uid(values.get(0x1000, b""))
    if len(sop_class) > 64 or len(sop_instance) > 64 or not (sop_class + sop_instance).isascii():
        raise ValueError("command set with an Affected SOP Class or Instance UID that is no UID (PS3.5 9.1)")
    return Command(field, message_id, sop_class, sop_instance, data_set_type != NO_DATASET)


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


# The requestor's side: requests as bytes, responses read back.

_DATASET_PRESENT = struct.pack("<H", 0x0000)  # CommandDataSetType: a data set follows (any value but 0x0101)


def _command_set(body: bytes) -> bytes:
    return _element(0x0000, struct.pack("<I", len(body))) + body


def encode_store_rq(message_id: int, sop_class_uid: str, sop_instance_uid: str, priority: int = 0) -> bytes:
    """A C-STORE-RQ command set (PS3.7 9.3.1.1); the data set follows in its own fragments."""
    return _command_set(_element(0x0002, _uid_value(sop_class_uid))
                        + _element(0x0100, struct.pack("<H", C_STORE_RQ))
                        + _element(0x0110, struct.pack("<H", message_id))
                        + _element(0x0700, struct.pack("<H", priority))
                        + _element(0x0800, _DATASET_PRESENT)
                        + _element(0x1000, _uid_value(sop_instance_uid)))


def encode_echo_rq(message_id: int) -> bytes:
    """A C-ECHO-RQ command set (PS3.7 9.3.5.1)."""
    return _command_set(_element(0x0002, _uid_value(VERIFICATION))
                        + _element(0x0100, struct.pack("<H", C_ECHO_RQ))
                        + _element(0x0110, struct.pack("<H", message_id))
                        + _element(0x0800, struct.pack("<H", NO_DATASET)))


@dataclass(frozen=True)
class Response:
    """The fields of a response command set an SCU acts on."""

    command_field: int
    message_id: int  # MessageIDBeingRespondedTo (0000,0120)
    status: int
    error_comment: str = ""  # ErrorComment (0000,0902), when the peer gave one
    sop_instance_uid: str = ""  # AffectedSOPInstanceUID (0000,1000), in a C-STORE-RSP


def parse_response(raw: bytes) -> Response:
    """Decode a response command set (C-STORE-RSP, C-ECHO-RSP); raises ValueError when malformed."""
    values = _command_elements(raw)
    try:
        field = struct.unpack("<H", values[0x0100])[0]
        message_id = struct.unpack("<H", values[0x0120])[0]
        status = struct.unpack("<H", values[0x0900])[0]
    except (KeyError, struct.error):
        raise ValueError("response lacks CommandField, MessageIDBeingRespondedTo or Status") from None
    comment = values.get(0x0902, b"").decode("latin-1").strip(" \x00")
    return Response(field, message_id, status, comment, _uid(values.get(0x1000, b"")))


_STATUS_MEANINGS = {  # PS3.7 Annex C and PS3.4 Table B.2-1, for the statuses a C-STORE can get
    0x0000: "Success",
    0x0105: "Failure: no such attribute", 0x0106: "Failure: invalid attribute value",
    0x0107: "Warning: attribute list error", 0x0110: "Failure: processing failure",
    0x0111: "Failure: duplicate SOP instance", 0x0116: "Warning: attribute value out of range",
    0x0117: "Failure: invalid SOP instance", 0x0118: "Failure: no such SOP class",
    0x0119: "Failure: class-instance conflict", 0x0120: "Failure: missing attribute",
    0x0121: "Failure: missing attribute value", 0x0122: "Refused: SOP class not supported",
    0x0124: "Refused: not authorized", 0x0210: "Failure: duplicate invocation",
    0x0211: "Failure: unrecognized operation", 0x0212: "Failure: mistyped argument",
    0x0213: "Failure: resource limitation",
    0xB000: "Warning: coercion of data elements", 0xB006: "Warning: elements discarded",
    0xB007: "Warning: data set does not match SOP class",
}


def status_meaning(status: int) -> str:
    """What a C-STORE response status means, in words."""
    if status in _STATUS_MEANINGS:
        return _STATUS_MEANINGS[status]
    for low, high, meaning in ((0xA700, 0xA7FF, "Refused: out of resources"),
                               (0xA900, 0xA9FF, "Error: data set does not match SOP class"),
                               (0xC000, 0xCFFF, "Error: cannot understand"),
                               (0xB000, 0xBFFF, "Warning")):
        if low <= status <= high:
            return meaning
    return "Failure" if status else "Success"


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



@dataclass(frozen=True)
class FileMeta:
    """What a sender needs from a Part 10 file's File Meta Information."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    dataset_offset: int  # where the data set starts: the first element after group 0002


class IncompleteMeta(ValueError):
    """The bytes given end inside the File Meta group; ``needed`` bytes would cover it."""

    def __init__(self, needed: int) -> None:
        super().__init__(f"File Meta Information cut short (needs {needed} bytes)")
        self.needed = needed


_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
_GROUP_ELEMENT = struct.Struct("<HH")


def read_file_meta(head: bytes | memoryview) -> FileMeta:
    """The File Meta of a Part 10 file whose first bytes are ``head`` (a walk over group 0002,
    Explicit VR Little Endian; the group length is not trusted). Raises ValueError when it is
    not a Part 10 file, IncompleteMeta when ``head`` ends inside the group."""
    if len(head) < 132:
        raise IncompleteMeta(132)
    if bytes(head[128:132]) != b"DICM":
        raise ValueError("no DICM prefix after the 128-byte preamble")
    values: dict[int, bytes] = {}
    pos, end = 132, len(head)
    while True:
        if pos + 8 > end:
            raise IncompleteMeta(pos + 8)
        group, element = _GROUP_ELEMENT.unpack_from(head, pos)
        if group != 0x0002:
            break
        vr = bytes(head[pos + 4:pos + 6])
        if not (vr.isalpha() and vr.isupper()):
            raise ValueError("File Meta Information is not in Explicit VR")
        if vr in _LONG_VRS:
            if pos + 12 > end:
                raise IncompleteMeta(pos + 12)
            length, start = struct.unpack_from("<I", head, pos + 8)[0], pos + 12
        else:
            length, start = struct.unpack_from("<H", head, pos + 6)[0], pos + 8
        if length == 0xFFFFFFFF:
            raise ValueError("undefined length in the File Meta Information")
        if start + length > end:
            raise IncompleteMeta(start + length + 8)
        if element in (0x0002, 0x0003, 0x0010):
            values[element] = bytes(head[start:start + length])
        pos = start + length
    missing = [name for element, name in ((0x0002, "MediaStorageSOPClassUID"),
                                          (0x0003, "MediaStorageSOPInstanceUID"),
                                          (0x0010, "TransferSyntaxUID")) if not _uid(values.get(element, b""))]
    if missing:
        raise ValueError(f"File Meta Information lacks {', '.join(missing)}")
    return FileMeta(_uid(values[0x0002]), _uid(values[0x0003]), _uid(values[0x0010]), pos)
