"""The drop-in widget in a real browser (headless Chromium, driven over the DevTools protocol):
a page served by NBV with one script tag shows the person's card — What, Why, How — live, and
what the person does with it comes back as responses that change the next decision."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from shared.settings import Settings
from tests.delivery_support import delivery_settings, nbv
from tests.factories import event_json
from tests.harness import auth_headers, eventually

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="chromium is not installed (apt-get install -y chromium) — the widget test needs it",
)


class Page:
    """The smallest DevTools client this test needs: navigate and evaluate."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        call_id = next(self._ids)
        await self._ws.send(json.dumps({"id": call_id, "method": method, "params": params}))
        while True:
            message = json.loads(await self._ws.recv())
            if message.get("id") == call_id:
                if "error" in message:
                    raise RuntimeError(message["error"])
                return dict(message.get("result", {}))

    async def js(self, expression: str) -> Any:
        result = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"].get("value")


@contextlib.asynccontextmanager
async def browser(tmp: Path) -> AsyncIterator[Page]:
    assert CHROMIUM is not None
    profile = tmp / "chromium"
    proc = await asyncio.create_subprocess_exec(
        *[
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--no-first-run",
            "--disable-component-update",
            "--disable-dev-shm-usage",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            "about:blank",
        ],
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or proc.returncode is not None:
                raise RuntimeError("chromium did not start its DevTools endpoint")
            await asyncio.sleep(0.1)
        port = port_file.read_text().split()[0]
        async with httpx.AsyncClient() as http:
            targets = (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
        page_ws = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        async with connect(page_ws, max_size=2**24) as ws:
            yield Page(ws)
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()


CARDS = """[...document.querySelectorAll('.nbv-card')].map(c => ({
  element_id: c.dataset.elementId,
  title: c.querySelector('.nbv-title').textContent,
  what: c.querySelector('.nbv-what').textContent,
  why: c.querySelector('.nbv-why').textContent,
  how: [...c.querySelectorAll('.nbv-resource')].map(a => [a.textContent, a.href]),
  buttons: [...c.querySelectorAll('button')].map(b => b.textContent),
  visible: c.getBoundingClientRect().height > 0,
}))"""


async def test_widget_shows_the_card_and_reports_back(
    embedded_settings: Settings, tmp_path: Path
) -> None:
    settings = delivery_settings(embedded_settings)
    async with (
        nbv(settings) as app,
        httpx.AsyncClient(timeout=10, headers=auth_headers()) as http,
        browser(tmp_path) as page,
    ):
        events = [
            event_json("user.identify", {"role": "end_user", "name": "Wen"}, user="w1"),
            event_json("product.track", {"event": "login", "feature_area": "core"}, user="w1"),
        ]
        assert (
            await http.post(f"{app.url}/v1/events/batch", json={"events": events})
        ).status_code == 202
        await eventually(
            lambda: http.get(f"{app.url}/v1/users/w1/view"), lambda r: r.status_code == 200
        )

        # The customer's backend mints a publishable key for w1; the page holds only that.
        minted = await http.post(f"{app.url}/v1/widget/keys", json={"user_id": "w1", "ttl_s": 600})
        assert minted.status_code == 201, minted.text
        widget_key = minted.json()["key"]
        assert widget_key.startswith("nbv_pk_")

        # The page is open before the decision: the card arrives live over the stream.
        await page.call("Page.enable")
        await page.call("Page.navigate", url=f"{app.url}/widget/demo?key={widget_key}")
        await eventually(
            lambda: page.js("!!window.NBVWidget"), bool, what="widget loaded", timeout=20
        )
        nbv_answer = await http.get(
            f"{app.url}/v1/next-best-value", params={"user_id": "w1", "limit": 2}
        )
        decision = nbv_answer.json()
        wanted = [i["element_id"] for i in decision["items"]]
        assert len(wanted) == 2

        cards = await eventually(
            lambda: page.js(CARDS), lambda c: len(c) == 2, what="two cards on screen"
        )
        by_id = {c["element_id"]: c for c in cards}
        for item in decision["items"]:
            card, content = by_id[item["element_id"]], item["content"]
            assert card["visible"] and card["title"] == content["title"]
            assert card["what"] == f"What: {content['what']}"
            assert card["why"] == f"Why: {content['why']}"
            assert [label for label, _ in card["how"]] == [r["label"] for r in content["how"]]
            assert card["buttons"] == ["Done", "Later", "Not for me"]

        async def statuses() -> dict[str, str]:
            r = await http.get(f"{app.url}/v1/users/w1/inbox", params={"include_closed": "true"})
            return {i["element_id"]: i["status"] for i in r.json()["items"]}

        # Rendering reported "shown" for both.
        await eventually(statuses, lambda s: all(s.get(e) == "shown" for e in wanted), what="shown")

        first, second = wanted
        # A resource click is reported (the link itself opens in a new tab).
        await page.js(
            f"document.querySelector('[data-element-id=\"{first}\"] .nbv-resource').click()"
        )
        await eventually(statuses, lambda s: s.get(first) == "clicked", what="clicked")
        # "Done" completes the first card; "Later" snoozes the second; both leave the screen.
        await page.js(f"document.querySelector('[data-element-id=\"{first}\"] .nbv-done').click()")
        await page.js(
            f"document.querySelector('[data-element-id=\"{second}\"] .nbv-later').click()"
        )
        await eventually(
            statuses, lambda s: s.get(first) == "completed" and s.get(second) == "snoozed"
        )
        # (the completion may well bring the next card in; these two are gone)
        await eventually(
            lambda: page.js(CARDS),
            lambda c: not {first, second} & {card["element_id"] for card in c},
            what="cards gone",
        )

        # The completion reached the view, so the next decision does not offer it again.
        await eventually(
            lambda: http.get(f"{app.url}/v1/users/w1/view"),
            lambda r: first in r.json().get("achieved", {}),
            what="achieved in the view",
        )
        again = await http.get(
            f"{app.url}/v1/next-best-value", params={"user_id": "w1", "limit": 20}
        )
        assert first not in [i["element_id"] for i in again.json()["items"]]
        await page.js("window.NBVWidget.close()")
