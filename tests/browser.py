"""A real headless browser on the Airflow UI: Debian's chromium, driven by the playwright wheel.

Signed in the way the UI itself is: a JWT from ``POST /auth/token``, set as the ``_token``
cookie of the API server's origin. The UI is a single-page app: a page is ready when the
network is idle and the text the test waits for is on it (a positive signal, not a pause).
``RADDEPLOY_DOCS_SCREENSHOTS=docs/images`` also writes each screenshot there, under its name, for
the docs (how README's pictures are made: docs/architecture.md, "Pictures in the docs").
"""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"


def token(api_url: str, user: str, password: str) -> str:
    request = urllib.request.Request(f"{api_url}/auth/token", data=json.dumps({"username": user, "password": password})
                                     .encode(), headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())["access_token"]


def screenshot(api_url: str, user: str, password: str, path: str, out: Path, wait_for_text: str,
               name: str | None = None, width: int = 1400, height: int = 900) -> str:
    """Open ``api_url + path`` signed in, wait until ``wait_for_text`` shows, save a PNG at ``out``;
    returns the page's visible text. ``name``: the file name under RADDEPLOY_DOCS_SCREENSHOTS."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make test` (scripts/ensure-system.sh installs chromium)")
    jwt = token(api_url, user, password)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            context = browser.new_context(viewport={"width": width, "height": height})
            context.add_cookies([{"name": "_token", "value": jwt, "url": api_url}])
            page = context.new_page()
            page.goto(api_url + path, wait_until="networkidle", timeout=60_000)
            page.get_by_text(wait_for_text, exact=False).first.wait_for(timeout=60_000)
            page.wait_for_load_state("networkidle", timeout=30_000)
            page.screenshot(path=str(out))
            text = page.inner_text("body")
        finally:
            browser.close()
    docs = os.environ.get("RADDEPLOY_DOCS_SCREENSHOTS")
    if docs and name:
        Path(docs).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out, Path(docs) / name)
    return text
