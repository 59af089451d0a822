"""The fields of a ``dicom`` connection, checked and turned into a :class:`Node`; no Airflow here.

:class:`~raddeploy_provider.hooks.dicom.DicomHook` reads a connection (or values given
directly) and hands the values to :func:`build_node`; ``raddeploy echo/send AE@HOST:PORT``
calls :func:`build_node` and :func:`echo_result` itself, so the command needs no Airflow for an
address, and both say the same things. :data:`FIELDS` describes each field once: the hook's
checks, the connection form (``get_provider_info``) and docs/connections.md follow it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the SCU (pynetdicom) is imported when a node is built: get_provider_info reads FIELDS
    from raddeploy_provider.dicom.scu import Node

DEFAULT_CALLING_AE = "RADDEPLOY"
DEFAULT_TIMEOUT = 30.0
DEFAULT_CONNECT_TIMEOUT = 10.0


@dataclass(frozen=True)
class Field:
    """One field of a ``dicom`` connection's extra (host and port are the standard fields)."""

    name: str
    label: str
    kind: str  # "string", "boolean", "number", "integer"
    description: str
    default: Any = None
    minimum: float | None = None
    placeholder: str | None = None

    def schema(self) -> dict[str, Any]:
        """The JSON schema Airflow's connection form renders (type, default, minimum, suggestions)."""
        schema: dict[str, Any] = {"type": [self.kind, "null"]}
        if self.default is not None:
            schema["default"] = self.default
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.kind == "string" and self.name.endswith("ae_title"):
            schema["maxLength"] = 16
        if self.kind == "string" and self.placeholder:  # Airflow's form offers these as suggestions
            schema["examples"] = [self.placeholder]
        return schema


FIELDS: tuple[Field, ...] = (
    Field("ae_title", "Called AE title", "string",
          "The node's AE title (the one we call): 1-16 characters. Required.", placeholder="PACS"),
    Field("calling_ae_title", "Calling AE title", "string",
          "Our AE title towards the node; the node must accept it.", DEFAULT_CALLING_AE,
          placeholder=DEFAULT_CALLING_AE),
    Field("tls", "TLS", "boolean", "Associate over TLS (DICOM TLS, often port 2762).", False),
    Field("tls_ca_file", "TLS CA file", "string",
          "PEM bundle of the CAs that sign the node's certificate, as a path on every worker (and on "
          "the API server, for the Test button). Empty: the system's CAs.",
          placeholder="/etc/raddeploy/tls/ca.pem"),
    Field("tls_cert_file", "TLS client certificate", "string",
          "Our client certificate (PEM), when the node asks for one; a path on every worker.",
          placeholder="/etc/raddeploy/tls/client.pem"),
    Field("tls_key_file", "TLS client key", "string",
          "The private key (PEM) of the client certificate; a path on every worker. Empty: it is in "
          "the certificate file.", placeholder="/etc/raddeploy/tls/client.key"),
    Field("tls_verify_hostname", "Verify the node's host name", "boolean",
          "Check that the node's certificate names the host. Turn off only for a node addressed by an "
          "IP its certificate does not list.", True),
    Field("timeout", "Timeout (s)", "number",
          "Seconds each wait for the node may take once connected (a response, a PDU, the release).",
          DEFAULT_TIMEOUT, minimum=1),
    Field("connect_timeout", "Connect timeout (s)", "number",
          "Seconds for the TCP connection, the TLS handshake and the answer to the association request.",
          DEFAULT_CONNECT_TIMEOUT,
          minimum=1),
    Field("max_associations", "Parallel associations", "integer",
          "How many associations a send may open at once (at least 1); ask the node's admin how many "
          "it allows.", 1, minimum=1),
)
FIELD_NAMES = {f.name for f in FIELDS}
#: The values build_node takes: host, port and every extra field.
VALUE_NAMES = ("host", "port", *(f.name for f in FIELDS))
TLS_FILES = ("tls_ca_file", "tls_cert_file", "tls_key_file")

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _unset(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


class _Checker:
    def __init__(self, source: str, labels: Mapping[str, str]) -> None:
        self.source, self.labels = source, labels

    def label(self, name: str) -> str:
        return self.labels.get(name, name)

    def fail(self, name: str, problem: str, fix: str) -> ValueError:
        return ValueError(f"{self.source}: {self.label(name)} {problem}: {fix}")

    def text(self, name: str, value: Any) -> str | None:
        return None if _unset(value) else str(value).strip()

    def ae(self, name: str, value: Any, default: str | None = None) -> str:
        ae = self.text(name, value) or default
        if ae is None:
            raise self.fail(name, "is not set", "set the node's AE title (1-16 characters, e.g. PACS)")
        if len(ae) > 16 or "\\" in ae or any(ord(c) < 32 for c in ae):
            raise self.fail(name, f"{ae!r} is not an AE title",
                            "use 1-16 characters, no backslash or control characters")
        return ae

    def boolean(self, name: str, value: Any, default: bool) -> bool:
        if _unset(value):
            return default
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise self.fail(name, f"{value!r} is not a yes/no value", "set true or false")

    def number(self, name: str, value: Any, default: float, minimum: float) -> float:
        if _unset(value):
            return default
        try:
            if isinstance(value, bool):
                raise ValueError
            number = float(value)
        except (TypeError, ValueError):
            raise self.fail(name, f"{value!r} is not a number", f"set seconds, at least {minimum:g}") from None
        if not number >= minimum:  # NaN fails too
            raise self.fail(name, f"is {value!r}", f"set seconds, at least {minimum:g}")
        return number

    def integer(self, name: str, value: Any, default: int | None, low: int, high: int | None, fix: str) -> int:
        if _unset(value):
            if default is None:
                raise self.fail(name, "is not set", fix)
            return default
        try:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            number = int(value.strip()) if isinstance(value, str) else int(value)
        except (TypeError, ValueError):
            raise self.fail(name, f"{value!r} is not a whole number", fix) from None
        if number < low or (high is not None and number > high):
            raise self.fail(name, f"is {number}", fix)
        return number

    def readable(self, name: str, value: Any) -> str | None:
        path = self.text(name, value)
        if path is None:
            return None
        path = os.path.expanduser(path)
        try:
            with open(path, "rb") as fh:
                fh.read(1)
        except OSError as exc:
            raise self.fail(name, f"{path} cannot be read on this host ({exc.strerror or exc})",
                            "put the PEM file at that path on every worker (and on the API server, for "
                            "the Test button), readable by Airflow's user, or correct the path") from None
        return path


def build_node(values: Mapping[str, Any], source: str, labels: Mapping[str, str] | None = None) -> Node:
    """The :class:`Node` these values describe, or ValueError naming ``source``, the field, what to set.

    ``values`` holds host, port and the extra fields of :data:`FIELDS` (None or "" for unset;
    strings such as ``"true"`` or ``"104"`` are read as a URI-form connection gives them).
    ``labels`` renames fields in the messages (the command line names its options).
    """
    from raddeploy_provider.dicom.scu import Node, Tls

    check = _Checker(source, labels or {})
    host = check.text("host", values.get("host"))
    if host is None:
        raise check.fail("host", "is not set", "set the node's host name or IP address")
    port = check.integer("port", values.get("port"), None, 1, 65535, "set the node's TCP port (1-65535, e.g. 104)")
    ae_title = check.ae("ae_title", values.get("ae_title"))
    calling = check.ae("calling_ae_title", values.get("calling_ae_title"), DEFAULT_CALLING_AE)
    use_tls = check.boolean("tls", values.get("tls"), False)
    verify = check.boolean("tls_verify_hostname", values.get("tls_verify_hostname"), True)
    given = [name for name in TLS_FILES if not _unset(values.get(name))]
    if not use_tls and given:
        raise check.fail(given[0], f"is set but {check.label('tls')} is off",
                         f"turn {check.label('tls')} on, or remove the TLS files")
    tls = None
    if use_tls:
        if not _unset(values.get("tls_key_file")) and _unset(values.get("tls_cert_file")):
            raise check.fail("tls_key_file", f"is set without {check.label('tls_cert_file')}",
                             "set the client certificate that goes with the key, or remove the key")
        files = {name: check.readable(name, values.get(name)) for name in TLS_FILES}
        tls = Tls(ca_file=files["tls_ca_file"], cert_file=files["tls_cert_file"], key_file=files["tls_key_file"],
                  verify_hostname=verify)
    return Node(
        host=host, port=port, ae_title=ae_title, calling_ae_title=calling,
        timeout=check.number("timeout", values.get("timeout"), DEFAULT_TIMEOUT, 1),
        connect_timeout=check.number("connect_timeout", values.get("connect_timeout"), DEFAULT_CONNECT_TIMEOUT, 1),
        tls=tls,
        max_associations=check.integer("max_associations", values.get("max_associations"), 1, 1, None,
                                       "set how many associations may be open at once, at least 1"),
    )


def echo_outcome(node: Node) -> tuple[str, str]:
    """C-ECHO ``node``: ``("ok" | "refused" | "unreachable", what happened in words)``; never raises."""
    from raddeploy_provider.dicom.scu import NodeUnreachable, echo

    try:
        status = echo(node)
    except NodeUnreachable as exc:
        return "unreachable", str(exc)
    except Exception as exc:  # any failure is an answer for the user, not a crash of the form
        return "unreachable", f"C-ECHO to {node} failed: {type(exc).__name__}: {exc}"
    if status == 0:
        return "ok", f"C-ECHO to {node}: success (0x0000)"
    if status < 0:
        return "refused", (f"C-ECHO to {node}: the node answered without a status: check that it supports "
                           "Verification (C-ECHO)")
    return "refused", (f"C-ECHO to {node}: status 0x{status:04X}, not success: the node associated but "
                       "refused the echo; ask its admin")


def echo_result(node: Node) -> tuple[bool, str]:
    """C-ECHO ``node``, in the words the Test button and ``raddeploy echo`` show; never raises."""
    outcome, message = echo_outcome(node)
    return outcome == "ok", message
