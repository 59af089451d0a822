"""DicomHook: a DICOM node from an Airflow connection (type ``dicom``) or given directly."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

from airflow.sdk import BaseHook

from raddeploy_provider.dicom.scu import Node, SendReport, echo, send_files
from raddeploy_provider.hooks.dicom_node import FIELD_NAMES, VALUE_NAMES, build_node, echo_result

log = logging.getLogger(__name__)


class DicomHook(BaseHook):
    """Owns how to reach one DICOM node; operators never open sockets themselves.

    The fields, their defaults and checks are ``hooks/dicom_node.py`` (``FIELDS``) and
    docs/connections.md. Values given here take precedence over the connection's, so a flow's
    destination (or ``raddeploy send --timeout``) may change one field of a connection.

    :param dicom_conn_id: an Airflow connection of type ``dicom``: host, port, and in extra
        ``ae_title`` (called), ``calling_ae_title``, ``tls``, ``tls_ca_file``, ``tls_cert_file``,
        ``tls_key_file``, ``tls_verify_hostname``, ``timeout``, ``connect_timeout``,
        ``max_associations``. Leave it out to give the node directly.
    :param host: the node's host, when no connection is used.
    :param port: the node's port.
    :param ae_title: the node's (called) AE title.
    :param calling_ae_title: our AE title towards the node (default RADDEPLOY).
    :param timeout: seconds each wait for the node may take once connected (default 30).
    :param connect_timeout: seconds for the TCP connection, the TLS handshake and the answer to
        the association request (default 10).
    :param tls: associate over TLS; ``tls_ca_file``, ``tls_cert_file``, ``tls_key_file`` and
        ``tls_verify_hostname`` as in a connection.
    :param max_associations: associations a send may open at once (default 1).
    """

    conn_name_attr = "dicom_conn_id"
    default_conn_name = "dicom_default"
    conn_type = "dicom"
    hook_name = "DICOM node"

    def __init__(self, dicom_conn_id: str | None = None, host: str | None = None, port: int | str | None = None,
                 ae_title: str | None = None, calling_ae_title: str | None = None,
                 timeout: float | None = None, *, connect_timeout: float | None = None, tls: bool | None = None,
                 tls_ca_file: str | None = None, tls_cert_file: str | None = None,
                 tls_key_file: str | None = None, tls_verify_hostname: bool | None = None,
                 max_associations: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dicom_conn_id = dicom_conn_id
        self._direct: dict[str, Any] = dict(
            host=host, port=port, ae_title=ae_title, calling_ae_title=calling_ae_title, timeout=timeout,
            connect_timeout=connect_timeout, tls=tls, tls_ca_file=tls_ca_file, tls_cert_file=tls_cert_file,
            tls_key_file=tls_key_file, tls_verify_hostname=tls_verify_hostname, max_associations=max_associations)

    @property
    def source(self) -> str:
        """What the messages name: the connection, or the node given directly."""
        return f"connection {self.dicom_conn_id!r}" if self.dicom_conn_id else "the DICOM node given directly"

    def values(self) -> dict[str, Any]:
        """Host, port and the extra fields: the connection's, then those given directly on top."""
        values: dict[str, Any] = dict.fromkeys(VALUE_NAMES)
        if self.dicom_conn_id:
            conn = self.get_connection(self.dicom_conn_id)
            extra = {key.removeprefix("extra__dicom__"): value for key, value in conn.extra_dejson.items()}
            unknown = sorted(set(extra) - FIELD_NAMES)
            if unknown:
                log.warning("connection %r: ignoring unknown extra fields %s (known: %s)", self.dicom_conn_id,
                            ", ".join(unknown), ", ".join(sorted(FIELD_NAMES)))
            values.update({key: value for key, value in extra.items() if key in FIELD_NAMES},
                          host=conn.host, port=conn.port)
        values.update({key: value for key, value in self._direct.items() if value is not None})
        return values

    def node(self) -> Node:
        """The node; ValueError naming the connection, the field and what to set if a value is wrong."""
        return build_node(self.values(), self.source)

    def echo(self) -> int:
        return echo(self.node())

    def send(self, paths: Iterable[Path]) -> SendReport:
        return send_files(self.node(), paths)

    def test_connection(self) -> tuple[bool, str]:
        """The UI's "Test" button (``[core] test_connection = Enabled``): a C-ECHO, in words."""
        try:
            node = self.node()
        except Exception as exc:  # a bad field or a missing connection: say so, do not raise into the API
            return False, str(exc)
        return echo_result(node)
