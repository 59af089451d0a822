"""DicomHook: the ``dicom`` connection type, field by field, its checks, and the Test button.

Connections come the way Airflow gives them to a worker: ``AIRFLOW_CONN_<ID>`` (JSON or URI
form), read back through ``BaseHook.get_connection``; the Test button is a real C-ECHO to a
DCMTK storescp.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from airflow.sdk.definitions.connection import Connection

from peers import StoreSCP, free_port, make_certificates
from raddeploy_provider.dicom.scu import Node, Tls
from raddeploy_provider.get_provider_info import get_provider_info
from raddeploy_provider.hooks.dicom import DicomHook
from raddeploy_provider.hooks.dicom_node import FIELDS


def define(monkeypatch: pytest.MonkeyPatch, conn_id: str, host: str | None = "pacs.hospital.local",
           port: int | None = 104, **extra) -> None:
    """An Airflow connection of type dicom in the environment (JSON form), as a worker sees it."""
    body = {"conn_type": "dicom", "host": host, "port": port, "extra": extra}
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({k: v for k, v in body.items() if v is not None}))


@pytest.fixture
def pem(tmp_path: Path):
    """PEM-named files that exist (the hook checks that they can be read; the SCU loads them)."""
    def make(name: str) -> str:
        path = tmp_path / name
        path.write_text("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n")
        return str(path)
    return make


# -- building the node -------------------------------------------------------------------

def test_every_field_of_a_connection(monkeypatch, pem) -> None:
    ca, cert, key = pem("ca.pem"), pem("client.pem"), pem("client.key")
    define(monkeypatch, "pacs_tls", host="pacs.hospital.local", port=2762, ae_title="PACS",
           calling_ae_title="RADDEPLOY_T", tls=True, tls_ca_file=ca, tls_cert_file=cert, tls_key_file=key,
           tls_verify_hostname=False, timeout=45, connect_timeout=5.5, max_associations=4)

    node = DicomHook(dicom_conn_id="pacs_tls").node()

    assert node == Node(host="pacs.hospital.local", port=2762, ae_title="PACS", calling_ae_title="RADDEPLOY_T",
                        timeout=45.0, connect_timeout=5.5,
                        tls=Tls(ca_file=ca, cert_file=cert, key_file=key, verify_hostname=False),
                        max_associations=4)
    assert str(node).startswith("PACS@pacs.hospital.local:2762")


def test_defaults_of_a_minimal_connection(monkeypatch) -> None:
    define(monkeypatch, "pacs", ae_title="PACS")

    assert DicomHook(dicom_conn_id="pacs").node() == Node(
        host="pacs.hospital.local", port=104, ae_title="PACS", calling_ae_title="RADDEPLOY", timeout=30.0,
        connect_timeout=10.0, tls=None, max_associations=1)


def test_the_form_s_defaults_and_cleared_fields_are_a_plain_node(monkeypatch) -> None:
    """What the UI saves: every field, defaults filled in, cleared strings as null or ""."""
    define(monkeypatch, "ui", ae_title="PACS", calling_ae_title="RADDEPLOY", tls=False, tls_ca_file=None,
           tls_cert_file="", tls_key_file=None, tls_verify_hostname=True, timeout=30, connect_timeout=10,
           max_associations=1)

    assert DicomHook(dicom_conn_id="ui").node() == Node(host="pacs.hospital.local", port=104, ae_title="PACS")


def test_uri_form_gives_strings_and_they_are_read_as_their_types(monkeypatch, pem) -> None:
    ca = pem("ca.pem")
    monkeypatch.setenv("AIRFLOW_CONN_PACS_URI", f"dicom://10.0.0.5:11112?ae_title=ARIA&tls=true&tls_ca_file={ca}"
                                                "&tls_verify_hostname=no&timeout=5&max_associations=2")

    node = DicomHook(dicom_conn_id="pacs_uri").node()

    assert (node.host, node.port, node.ae_title, node.timeout, node.max_associations) == ("10.0.0.5", 11112, "ARIA",
                                                                                          5.0, 2)
    assert node.tls == Tls(ca_file=ca, verify_hostname=False)


def test_tls_with_the_system_cas(monkeypatch) -> None:
    define(monkeypatch, "pacs", ae_title="PACS", tls=True)

    assert DicomHook(dicom_conn_id="pacs").node().tls == Tls()


def test_values_given_directly_override_the_connection(monkeypatch) -> None:
    define(monkeypatch, "pacs", ae_title="PACS", calling_ae_title="FROM_CONN", timeout=45)

    node = DicomHook(dicom_conn_id="pacs", calling_ae_title="FROM_FLOW", max_associations=3).node()

    assert (node.ae_title, node.calling_ae_title, node.timeout, node.max_associations) == ("PACS", "FROM_FLOW",
                                                                                           45.0, 3)


def test_a_node_given_directly_as_the_operators_give_it() -> None:
    hook = DicomHook(dicom_conn_id=None, host="10.0.0.5", port=104, ae_title="ARIA", calling_ae_title=None)

    assert hook.node() == Node(host="10.0.0.5", port=104, ae_title="ARIA")


# -- what is wrong, and what to set -------------------------------------------------------

BAD = [
    ({"max_associations": 0}, "connection 'pacs': max_associations is 0: set how many associations"),
    ({"max_associations": "two"}, "connection 'pacs': max_associations 'two' is not a whole number"),
    ({"max_associations": 1.5}, "max_associations 1.5 is not a whole number"),
    ({"tls_ca_file": "/etc/ca.pem"}, "connection 'pacs': tls_ca_file is set but tls is off: turn tls on"),
    ({"tls_cert_file": "/etc/c.pem", "tls": False}, "tls_cert_file is set but tls is off"),
    ({"tls": True, "tls_key_file": "/etc/k.pem"},
     "connection 'pacs': tls_key_file is set without tls_cert_file: set the client certificate"),
    ({"tls": True, "tls_ca_file": "/nonexistent/ca.pem"},
     "connection 'pacs': tls_ca_file /nonexistent/ca.pem cannot be read on this host (No such file or directory): "
     "put the PEM file at that path on every worker"),
    ({"tls": "maybe"}, "connection 'pacs': tls 'maybe' is not a yes/no value: set true or false"),
    ({"tls_verify_hostname": 2}, "tls_verify_hostname 2 is not a yes/no value"),
    ({"timeout": 0}, "connection 'pacs': timeout is 0: set seconds, at least 1"),
    ({"connect_timeout": "soon"}, "connection 'pacs': connect_timeout 'soon' is not a number"),
    ({"ae_title": None}, "connection 'pacs': ae_title is not set: set the node's AE title"),
    ({"ae_title": "A_VERY_LONG_AE_TITLE"}, "ae_title 'A_VERY_LONG_AE_TITLE' is not an AE title: use 1-16"),
    ({"calling_ae_title": "BACK\\SLASH"}, "calling_ae_title 'BACK\\\\SLASH' is not an AE title"),
]


@pytest.mark.parametrize(("extra", "message"), BAD, ids=[next(iter(e)) + f"={next(iter(e.values()))!r}"
                                                         for e, _ in BAD])
def test_a_bad_field_names_the_connection_the_field_and_what_to_set(monkeypatch, extra, message) -> None:
    define(monkeypatch, "pacs", **{"ae_title": "PACS", **extra})

    with pytest.raises(ValueError) as caught:
        DicomHook(dicom_conn_id="pacs").node()
    assert message in str(caught.value)


def test_missing_host_and_bad_ports(monkeypatch) -> None:
    define(monkeypatch, "nohost", host=None, ae_title="PACS")
    with pytest.raises(ValueError, match="connection 'nohost': host is not set: set the node's host name"):
        DicomHook(dicom_conn_id="nohost").node()
    define(monkeypatch, "noport", port=None, ae_title="PACS")
    with pytest.raises(ValueError, match=r"connection 'noport': port is not set: set the node's TCP port \(1-65535"):
        DicomHook(dicom_conn_id="noport").node()
    define(monkeypatch, "bigport", port=70000, ae_title="PACS")
    with pytest.raises(ValueError, match="connection 'bigport': port is 70000: set the node's TCP port"):
        DicomHook(dicom_conn_id="bigport").node()
    with pytest.raises(ValueError, match="the DICOM node given directly: port 'abc' is not a whole number"):
        DicomHook(host="h", port="abc", ae_title="PACS").node()


def test_a_port_that_is_not_a_number_in_a_connection_object(monkeypatch) -> None:
    """Airflow drops an AIRFLOW_CONN_ JSON with such a port; a secrets backend may still hand one over."""
    conn = Connection(conn_id="pacs", conn_type="dicom", host="h", port="one-oh-four",
                      extra=json.dumps({"ae_title": "PACS"}))
    monkeypatch.setattr(DicomHook, "get_connection", classmethod(lambda cls, conn_id: conn))

    with pytest.raises(ValueError, match="connection 'pacs': port 'one-oh-four' is not a whole number: set"):
        DicomHook(dicom_conn_id="pacs").node()


# -- the connection form -------------------------------------------------------------------

def test_the_form_declares_every_field_the_hook_reads() -> None:
    [conn_type] = get_provider_info()["connection-types"]
    fields = conn_type["conn-fields"]

    assert conn_type["connection-type"] == DicomHook.conn_type
    assert set(fields) == {f.name for f in FIELDS} == {
        "ae_title", "calling_ae_title", "tls", "tls_ca_file", "tls_cert_file", "tls_key_file",
        "tls_verify_hostname", "timeout", "connect_timeout", "max_associations"}
    assert all(f["label"] and f["description"] for f in fields.values())
    assert fields["tls"]["schema"] == {"type": ["boolean", "null"], "default": False}
    assert fields["tls_verify_hostname"]["schema"] == {"type": ["boolean", "null"], "default": True}
    assert fields["max_associations"]["schema"] == {"type": ["integer", "null"], "default": 1, "minimum": 1}
    assert fields["timeout"]["schema"]["type"] == ["number", "null"]
    behaviour = conn_type["ui-field-behaviour"]
    assert set(behaviour["hidden-fields"]) == {"schema", "login", "password"}
    assert behaviour["placeholders"]["host"] == "pacs.hospital.local" and behaviour["placeholders"]["port"] == "104"


def test_airflow_reads_the_form_as_the_ui_asks_for_it() -> None:
    """The service behind GET /ui/connections/hook_meta, in-process (the e2e test asks a running API)."""
    from airflow.api_fastapi.core_api.services.ui.connections import HookMetaService

    [meta] = [m for m in HookMetaService.hook_meta_data() if m.connection_type == "dicom"]

    assert meta.hook_name == "DICOM node" and meta.hook_class_name == "raddeploy_provider.hooks.dicom.DicomHook"
    assert set(meta.extra_fields) == {f.name for f in FIELDS}
    assert meta.extra_fields["tls"]["schema"]["title"] == "TLS"
    assert meta.extra_fields["timeout"]["value"] == 30
    assert meta.standard_fields.host.placeholder == "pacs.hospital.local"
    assert meta.standard_fields.login.hidden and meta.standard_fields.password.hidden
    assert meta.standard_fields.url_schema.hidden


# -- the Test button -------------------------------------------------------------------------

@pytest.mark.integration
def test_test_connection_echoes_a_live_node(monkeypatch, storescp) -> None:
    define(monkeypatch, "scp", host="127.0.0.1", port=storescp.port, ae_title=storescp.ae_title)

    assert DicomHook(dicom_conn_id="scp").test_connection() == (
        True, f"C-ECHO to {storescp.ae_title}@127.0.0.1:{storescp.port}: success (0x0000)")


@pytest.mark.integration
def test_test_connection_to_a_dead_port_says_so(monkeypatch) -> None:
    port = free_port()
    define(monkeypatch, "dead", host="127.0.0.1", port=port, ae_title="NOBODY", connect_timeout=2)

    ok, message = DicomHook(dicom_conn_id="dead").test_connection()

    assert not ok
    assert f"127.0.0.1:{port}" in message, message


def test_test_connection_reports_a_bad_field_or_a_missing_connection(monkeypatch) -> None:
    define(monkeypatch, "pacs", ae_title="PACS", max_associations=0)

    ok, message = DicomHook(dicom_conn_id="pacs").test_connection()
    assert not ok and message.startswith("connection 'pacs': max_associations is 0")

    ok, message = DicomHook(dicom_conn_id="nowhere").test_connection()
    assert not ok and "nowhere" in message


@pytest.fixture
def tls_scp(tmp_path: Path):
    """A storescp over TLS (server certificate for localhost/127.0.0.1) that requires a client certificate."""
    pki = make_certificates(tmp_path / "pki")
    scp = StoreSCP(tmp_path / "tls-scp", ae_title="TLSSCP",
                   extra_args=("+tls", str(pki["server.key"]), str(pki["server.crt"]), "+cf", str(pki["ca.crt"])))
    yield scp, pki
    scp.stop()


@pytest.mark.integration
def test_test_connection_over_tls_with_a_client_certificate(monkeypatch, tls_scp) -> None:
    scp, pki = tls_scp
    define(monkeypatch, "tls_pacs", host="localhost", port=scp.port, ae_title=scp.ae_title, tls=True,
           tls_ca_file=str(pki["ca.crt"]), tls_cert_file=str(pki["client.crt"]), tls_key_file=str(pki["client.key"]))

    assert DicomHook(dicom_conn_id="tls_pacs").test_connection() == (
        True, f"C-ECHO to {scp.ae_title}@localhost:{scp.port} (TLS): success (0x0000)")

    define(monkeypatch, "tls_untrusted", host="localhost", port=scp.port, ae_title=scp.ae_title, tls=True,
           tls_cert_file=str(pki["client.crt"]), tls_key_file=str(pki["client.key"]))  # the system's CAs
    ok, message = DicomHook(dicom_conn_id="tls_untrusted").test_connection()
    assert not ok and "certificate verify failed" in message, message


def test_docs_list_every_field_with_its_form_label() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "connections.md").read_text()

    missing = [f.name for f in FIELDS if f"| `{f.name}` | {f.label} | {f.kind} |" not in text]
    assert missing == [], f"docs/connections.md lacks rows for {missing}"
