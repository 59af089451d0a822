"""The few DIMSE and upper-layer encodings a storage SCP needs, done directly on bytes.

A C-STORE request's command set is a handful of elements in Implicit VR Little Endian; its
response is another handful. Decoding and encoding them here, instead of building pydicom
datasets, is most of what makes the receive path lean. PS3.7 Annex E (command sets),
PS3.8 9.3 (PDUs), PS3.10 7.1 (the File Meta Information written in front of each file).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pydicom.uid import generate_uid

# Command Field values (PS3.7 E.1)
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
NO_DATASET = 0x0101

#: Deterministic, under pydicom's UID root (which exists for exactly this use).
IMPLEMENTATION_CLASS_UID = str(generate_uid(entropy_srcs=["raddeploy-provider implementation class"]))
IMPLEMENTATION_VERSION = "RADDEPLOY_01"

_TAG_LEN = struct.Struct("<HHI")
_PDU_HEAD = struct.Struct(">BBI")
_PDV_HEAD = struct.Struct(">IBB")


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


def p_data_pdu(context_id: int, command: bytes) -> bytes:
    """One P-DATA-TF PDU with the whole command set as its last fragment (responses are small)."""
    pdv = _PDV_HEAD.pack(len(command) + 2, context_id, 0x03) + command
    return _PDU_HEAD.pack(0x04, 0, len(pdv)) + pdv


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
