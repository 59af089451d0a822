"""The preview route's file side and URLs (raddeploy_provider.plugins.previews), without a server.

What the route serves is decided before any file is opened (names and ids), then the file is
opened below ``runs/`` without following a symlink; these tests make the data dir and look
for every way out of it. The authentication of real requests: tests/e2e/test_preview_route.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from raddeploy_provider.plugins import previews as plugin
from raddeploy_provider.store.layout import DataDir

PNG = plugin.PNG_SIGNATURE + b"\x00\x00\x00\rIHDR" + b"\x00" * 32
DAG, RUN = "body_contour", "1.2.826.0.1.3680043.8.498.1.1"


@pytest.fixture
def data(tmp_path: Path) -> DataDir:
    data = DataDir(tmp_path / "data")
    previews = data.run(DAG, RUN).previews
    previews.mkdir(parents=True)
    (previews / "axial_1.png").write_bytes(PNG)
    (tmp_path / "secret.png").write_bytes(PNG + b"secret")  # outside the data dir: never served
    (data.root / "secret.png").write_bytes(PNG + b"secret")
    return data


def test_a_picture_of_the_run_is_read(data: DataDir) -> None:
    assert plugin.read_preview(data, DAG, RUN, "axial_1.png") == PNG


@pytest.mark.parametrize("dag_id, run_id, name", [
    (DAG, RUN, "missing.png"),
    (DAG, RUN, "../../../secret.png"), (DAG, RUN, "..%2F..%2Fsecret.png"), (DAG, RUN, ".."), (DAG, RUN, "..png"),
    (DAG, RUN, "a/../axial_1.png"), (DAG, RUN, ".hidden.png"), (DAG, RUN, "axial_1.PNG"), (DAG, RUN, "axial_1.png\x00"),
    (DAG, "..", "secret.png"), ("..", "..", "secret.png"), (DAG, "../..", "secret.png"), ("", RUN, "axial_1.png"),
    (DAG, f"{RUN}/previews", "axial_1.png"), (f"{DAG}/{RUN}", "previews", "axial_1.png"), (DAG, ".", "axial_1.png"),
])
def test_names_that_leave_the_run_folder_are_refused(data: DataDir, dag_id: str, run_id: str, name: str) -> None:
    assert plugin.read_preview(data, dag_id, run_id, name) is None


def test_symlinks_are_not_followed(data: DataDir, tmp_path: Path) -> None:
    previews = data.run(DAG, RUN).previews
    (previews / "link.png").symlink_to(tmp_path / "secret.png")
    (previews / "inside.png").symlink_to(previews / "axial_1.png")  # even one that stays inside
    assert plugin.read_preview(data, DAG, RUN, "link.png") is None
    assert plugin.read_preview(data, DAG, RUN, "inside.png") is None
    outside = tmp_path / "elsewhere" / "previews"
    outside.mkdir(parents=True)
    (outside / "axial_1.png").write_bytes(PNG)
    (data.runs / DAG / "linked.run").symlink_to(outside.parent)          # a run folder that is a link
    assert plugin.read_preview(data, DAG, "linked.run", "axial_1.png") is None
    (data.runs / "linked_dag").symlink_to(data.runs / DAG)               # a DAG folder that is a link
    assert plugin.read_preview(data, "linked_dag", RUN, "axial_1.png") is None
    other = data.run(DAG, "2.1").root
    other.mkdir()
    (other / "previews").symlink_to(previews)                            # a previews folder that is a link
    assert plugin.read_preview(data, DAG, "2.1", "axial_1.png") is None


def test_only_regular_png_files(data: DataDir) -> None:
    previews = data.run(DAG, RUN).previews
    (previews / "notes.txt").write_text("not a picture")
    (previews / "fake.png").write_text("not a picture either")
    (previews / "folder.png").mkdir()
    os.mkfifo(previews / "fifo.png")  # would block a plain open()
    for name in ("notes.txt", "fake.png", "folder.png", "fifo.png"):
        assert plugin.read_preview(data, DAG, RUN, name) is None, name


def test_preview_urls() -> None:
    assert plugin.preview_url(DAG, RUN, "axial_1.png") == f"raddeploy/runs/{DAG}/{RUN}/previews/axial_1.png"
    assert plugin.preview_url("d", "a:b+c~1", "coronal.png") == "raddeploy/runs/d/a%3Ab%2Bc~1/previews/coronal.png"
    assert (plugin.URL_PREFIX + plugin.ROUTE).format(dag_id="d", run_id="r", name="n.png") == "/" + plugin.preview_url(
        "d", "r", "n.png")
    for args in ((DAG, RUN, "../x.png"), (DAG, RUN, "x.txt"), (DAG, "..", "x.png"), ("a/b", RUN, "x.png")):
        with pytest.raises(ValueError):
            plugin.preview_url(*args)


def test_the_plugin_is_one_airflow_loads() -> None:
    from airflow.api_fastapi.app import RESERVED_URL_PREFIXES
    from airflow.plugins_manager import is_valid_plugin

    assert is_valid_plugin(plugin.RadDeployPlugin)
    (app,) = plugin.RadDeployPlugin.fastapi_apps
    assert app["url_prefix"] == plugin.URL_PREFIX
    assert not any(app["url_prefix"].startswith(prefix) for prefix in RESERVED_URL_PREFIXES)


def test_importing_the_plugin_imports_no_api_server() -> None:
    """Every Airflow process loads plugins: FastAPI and Airflow's API come only with the first request."""
    code = ("import sys, raddeploy_provider.plugins.previews; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'fastapi' or m.startswith('airflow.api_fastapi')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
