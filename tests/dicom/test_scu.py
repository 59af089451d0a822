"""Sending stored files to a real DCMTK storescp: byte-exact, many instances, clear failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicom_factory import make_series
from peers import free_port
from raddeploy_provider.dicom.scu import Node, SendError, SendReport, echo, send_files

pytestmark = pytest.mark.integration


def payload(path: Path) -> bytes:
    raw = path.read_bytes()
    group_len = int.from_bytes(raw[140:144], "little")
    return raw[144 + group_len:]


def test_echo_and_send_series_byte_exact(storescp, tmp_path):
    node = Node("127.0.0.1", storescp.port, storescp.ae_title)
    assert echo(node) == 0
    series = make_series(tmp_path / "ct", slices=4)
    report = send_files(node, series.files)
    assert report.ok and sorted(report.accepted) == sorted(map(str, series.files))
    received = storescp.files()
    assert sorted(payload(p) for p in received) == sorted(payload(p) for p in series.files)


def test_thousands_of_instances_without_a_stall(storescp, tmp_path):
    """Guards pynetdicom 3.0.4's sender race (see dicom/scu.py): a stall would time out."""
    series = make_series(tmp_path / "small", slices=1500, size=8)
    node = Node("127.0.0.1", storescp.port, storescp.ae_title, timeout=10)
    for attempt in range(2):
        report = send_files(node, series.files)
        assert report.ok, f"attempt {attempt}: {list(report.failed.items())[:3]}"
        assert len(report.accepted) == 1500


def test_unreachable_node_fails_every_file_with_the_reason(tmp_path):
    series = make_series(tmp_path / "ct", slices=2)
    report = send_files(Node("127.0.0.1", free_port(), "NOBODY", timeout=3), series.files)
    assert report.accepted == []
    assert set(report.failed) == set(map(str, series.files))
    assert all("no association" in why for why in report.failed.values())
    message = str(SendError(report))
    assert message.startswith("2 of 2 files not accepted by NOBODY@127.0.0.1:")


def test_unreadable_file_is_reported_and_the_rest_sent(storescp, tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    series = make_series(tmp_path / "ct", slices=1)
    report: SendReport = send_files(Node("127.0.0.1", storescp.port, storescp.ae_title), [junk, *series.files])
    assert report.accepted == [str(series.files[0])]
    assert "not a DICOM Part 10 file" in report.failed[str(junk)]
