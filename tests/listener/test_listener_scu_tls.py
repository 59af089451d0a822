"""Our sender (dicom/scu.py) to our own listener in TLS mode: client certificate required."""

from __future__ import annotations

import pytest

from dicom_factory import make_series
from peers import make_certificates
from raddeploy_provider.dicom.scu import Node, NodeUnreachable, Tls, echo, send_files

pytestmark = pytest.mark.integration


def test_send_files_to_the_listener_over_tls(start_listener, tmp_path):
    certs = make_certificates(tmp_path / "certs")
    listener = start_listener(tls_cert=certs["server.crt"], tls_key=certs["server.key"], tls_ca=certs["ca.crt"])
    series = make_series(tmp_path / "ct", slices=5, size=256)
    tls = Tls(str(certs["ca.crt"]), str(certs["client.crt"]), str(certs["client.key"]))
    node = Node("localhost", listener.port, "RADDEPLOY", tls=tls, max_associations=2)

    assert echo(node) == 0
    report = send_files(node, series.files)
    assert report.ok, report.failed
    stored = sorted(p for p in (listener.data / "studies").rglob("*") if p.is_file())
    assert len(stored) == 5

    # Without our certificate the listener refuses; plain TCP too; each is one sentence.
    anonymous = send_files(Node("localhost", listener.port, "RADDEPLOY", tls=Tls(str(certs["ca.crt"]))),
                           series.files[:2])
    assert anonymous.unreachable and "client certificate" in anonymous.unreachable, anonymous.unreachable
    assert all(r.reason == "not sent" for r in anonymous.results)
    with pytest.raises(NodeUnreachable, match="expects TLS"):
        echo(Node("127.0.0.1", listener.port, "RADDEPLOY"))
