"""The review pictures' route on the embedded stack's real API server (the session stack of
tests/e2e/conftest.py): ``GET /raddeploy/runs/{dag_id}/{run_id}/previews/{name}``.

A PNG written into a run folder of the stack's data dir comes back with the admin's JWT (as a
bearer token and as the UI's ``_token`` cookie); without one the answer is 401, with a token
that does not verify 403; paths that would leave the run folder (``..``, encoded ``..`` and
slashes, symlinks) and files that are not PNGs are 404, while a PNG outside the run folder
that such a path would reach is there to be leaked.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse

import pytest
from PIL import Image

from raddeploy.embedded import EmbeddedStack
from raddeploy_provider.plugins.previews import preview_url

pytestmark = pytest.mark.e2e

DAG, RUN = "e2e_ct_threshold", "1.2.826.0.1.3680043.8.498.99.1"


def request(stack: EmbeddedStack, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
    """One GET of ``path`` exactly as written (http.client sends it unchanged: no dot-segment removal)."""
    host, port = urllib.parse.urlsplit(stack.api_url).hostname, urllib.parse.urlsplit(stack.api_url).port
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def token(stack: EmbeddedStack) -> str:
    host, port = urllib.parse.urlsplit(stack.api_url).hostname, urllib.parse.urlsplit(stack.api_url).port
    connection = http.client.HTTPConnection(host, port, timeout=30)
    try:
        body = json.dumps({"username": "admin", "password": stack.passwords()["admin"]})
        connection.request("POST", "/auth/token", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        assert response.status in (200, 201), response.read()
        return json.loads(response.read())["access_token"]
    finally:
        connection.close()


@pytest.fixture(scope="module")
def pictures(stack: EmbeddedStack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A PNG in a run folder's previews/, and PNGs outside it that a way out would reach."""
    run = stack.data_dir / "runs" / DAG / RUN
    (run / "previews").mkdir(parents=True)
    made = tmp_path_factory.mktemp("png")
    Image.new("RGB", (8, 4), (0, 255, 0)).save(made / "a.png")
    Image.new("RGB", (4, 8), (255, 0, 0)).save(made / "secret.png")
    picture, secret = (made / "a.png").read_bytes(), (made / "secret.png").read_bytes()
    (run / "previews" / "axial_1.png").write_bytes(picture)
    (run / "previews" / "notes.txt").write_text("not a picture")
    (run / "previews" / "fake.png").write_text("not a picture either")
    (run / "secret.png").write_bytes(secret)                       # in the run folder, not in previews/
    (stack.data_dir / "secret.png").write_bytes(secret)            # in the data dir
    (stack.data_dir / "runs" / "secret.png").write_bytes(secret)
    (run / "previews" / "link.png").symlink_to(made / "secret.png")
    outside = made / "elsewhere"
    (outside / "previews").mkdir(parents=True)
    (outside / "previews" / "axial_1.png").write_bytes(secret)
    (run.parent / "linked.1").symlink_to(outside)
    return {"picture": picture, "secret": secret}


def test_the_admin_gets_the_picture(stack: EmbeddedStack, pictures: dict[str, bytes]) -> None:
    path = "/" + preview_url(DAG, RUN, "axial_1.png")
    jwt = token(stack)
    status, headers, body = request(stack, path, {"Authorization": f"Bearer {jwt}"})
    assert (status, body) == (200, pictures["picture"]), body[:300]
    assert headers["content-type"] == "image/png"
    status, _, body = request(stack, path, {"Cookie": f"_token={jwt}"})   # how the UI's <img> asks
    assert (status, body) == (200, pictures["picture"])


def test_who_is_not_signed_in_is_refused(stack: EmbeddedStack, pictures: dict[str, bytes]) -> None:
    path = "/" + preview_url(DAG, RUN, "axial_1.png")
    status, _, body = request(stack, path)
    assert status == 401 and pictures["picture"] not in body
    forged = token(stack)[:-4] + "AAAA"  # a signature that does not verify
    for headers in ({"Authorization": f"Bearer {forged}"}, {"Cookie": f"_token={forged}"}):
        status, _, body = request(stack, path, headers)
        assert status in (401, 403) and pictures["picture"] not in body, (headers, status)


@pytest.mark.parametrize("path", [
    f"/raddeploy/runs/{DAG}/{RUN}/previews/../secret.png",
    f"/raddeploy/runs/{DAG}/{RUN}/previews/../../../secret.png",
    f"/raddeploy/runs/{DAG}/{RUN}/previews/..%2Fsecret.png",
    f"/raddeploy/runs/{DAG}/{RUN}/previews/..%2F..%2F..%2Fsecret.png",
    f"/raddeploy/runs/{DAG}/{RUN}/previews/%2E%2E%2Fsecret.png",
    f"/raddeploy/runs/{DAG}/{RUN}/previews/%2e%2e",
    f"/raddeploy/runs/{DAG}/{RUN}/previews/%2Ftmp%2Fsecret.png",
    f"/raddeploy/runs/{DAG}/..%2F..%2F..%2F/previews/secret.png",
    f"/raddeploy/runs/{DAG}/..%2F..%2F../previews/secret.png",
    f"/raddeploy/runs/..%2F..%2F/{RUN}/previews/secret.png",
    f"/raddeploy/runs/{DAG}/%2E%2E/previews/secret.png",
    f"/raddeploy/runs/{DAG}/{RUN}/previews/link.png",                 # a symlink to a PNG outside
    f"/raddeploy/runs/{DAG}/linked.1/previews/axial_1.png",           # a run folder that is a symlink
    f"/raddeploy/runs/{DAG}/{RUN}/previews/notes.txt",                # not a .png
    f"/raddeploy/runs/{DAG}/{RUN}/previews/fake.png",                 # .png, but not a PNG
    f"/raddeploy/runs/{DAG}/{RUN}/previews/missing.png",
])
def test_ways_out_of_the_run_folder_are_404(stack: EmbeddedStack, pictures: dict[str, bytes], path: str) -> None:
    status, _, body = request(stack, path, {"Authorization": f"Bearer {token(stack)}"})
    assert status == 404, (status, body[:300])
    assert pictures["secret"] not in body and b"PNG" not in body
