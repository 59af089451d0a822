"""DicomHook: a DICOM node from an Airflow connection (type ``dicom``) or given directly."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from airflow.sdk import BaseHook

from raddeploy_provider.dicom.scu import Node, SendReport, echo, send_files


class DicomHook(BaseHook):
    """Owns how to reach one DICOM node; operators never open sockets themselves.

    :param dicom_conn_id: an Airflow connection of type ``dicom``: host, port, and in extra
        ``ae_title`` (called) and ``calling_ae_title``. Leave it out to give the node directly.
    :param host: the node's host, when no connection is used.
    :param port: the node's port.
    :param ae_title: the node's (called) AE title.
    :param calling_ae_title: our AE title towards the node.
    :param timeout: seconds for association, network and DIMSE waits.
    """

    conn_name_attr = "dicom_conn_id"
    default_conn_name = "dicom_default"
    conn_type = "dicom"
    hook_name = "DICOM node"

    def __init__(self, dicom_conn_id: str | None = None, host: str | None = None, port: int | None = None,
                 ae_title: str | None = None, calling_ae_title: str | None = None, timeout: float = 30.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dicom_conn_id = dicom_conn_id
        self._direct = dict(host=host, port=port, ae_title=ae_title, calling_ae_title=calling_ae_title)
        self.timeout = timeout

    def node(self) -> Node:
        values = dict(self._direct)
        if self.dicom_conn_id:
            conn = self.get_connection(self.dicom_conn_id)
            extra = conn.extra_dejson
            values = dict(host=conn.host, port=conn.port, ae_title=extra.get("ae_title"),
                          calling_ae_title=values["calling_ae_title"] or extra.get("calling_ae_title"))
        missing = [k for k in ("host", "port", "ae_title") if not values.get(k)]
        if missing:
            source = f"connection {self.dicom_conn_id!r}" if self.dicom_conn_id else "the destination"
            raise ValueError(f"{source} lacks {', '.join(missing)}: set them so the node can be reached")
        return Node(host=str(values["host"]), port=int(values["port"]), ae_title=str(values["ae_title"]),
                    calling_ae_title=str(values.get("calling_ae_title") or "RADDEPLOY"), timeout=self.timeout)

    def echo(self) -> int:
        return echo(self.node())

    def send(self, paths: Iterable[Path]) -> SendReport:
        return send_files(self.node(), paths)

    def test_connection(self) -> tuple[bool, str]:
        """Used by the UI's "Test" button on a ``dicom`` connection."""
        try:
            status = self.echo()
        except Exception as exc:
            return False, str(exc)
        return status == 0, f"C-ECHO status 0x{status:04X}"
