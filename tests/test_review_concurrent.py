"""The review app next to the screening daemon: verdicts are written while `edge-agent run` screens a stream
of images. Nothing may block for good or be lost: every image gets exactly one outcome, and every verdict the
app acknowledged is in the database (a verdict answered "busy" is retried, as the page tells the clinician)."""
from __future__ import annotations

import http.cookiejar
import re
import threading
import urllib.error
import urllib.parse
import urllib.request

import pytest

pytest.importorskip("flask", reason="the review app needs the [review] extra (Flask)")

from conftest import rows  # noqa: E402
from faults import AgentProc, assert_exactly_once, distinct_images, sha, site_args, wait_for, write_images  # noqa: E402
from review_server import start_review  # noqa: E402


class Browser:
    """A cookie-keeping HTTP client that does not follow redirects (a 303 is the acknowledgement)."""

    def __init__(self, base: str) -> None:
        self.base = base

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *a, **kw):  # noqa: ANN002, ANN003
                return None

        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()),
                                                  NoRedirect)

    def get(self, path: str) -> str:
        with self.opener.open(self.base + path.lstrip("/"), timeout=60) as r:
            return r.read().decode()

    def post(self, path: str, data: dict[str, str]) -> int:
        body = urllib.parse.urlencode(data).encode()
        try:
            with self.opener.open(self.base + path.lstrip("/"), data=body, timeout=60) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code


def test_verdicts_while_the_daemon_screens(dirs, bundle_dir, tmp_path, procs) -> None:
    first = distinct_images(4, seed=1)
    names = write_images(dirs["inbox"], first, prefix="first")
    shas = {n: sha(d) for n, d in zip(names, first)}
    agent = AgentProc("run", site_args(dirs, bundle_dir), tmp_path / "agent.log", registry=procs)
    def screened() -> int:
        try:
            return len(rows(dirs["db"], "SELECT id FROM results"))
        except Exception:  # noqa: BLE001 - not created yet
            return 0

    wait_for(lambda: screened() == 4, proc=agent, what="the first images screened")
    review, url = start_review(dirs, bundle_dir, tmp_path / "review.log")
    procs.append(review)
    b = Browser(url)
    token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', b.get("/case/1")).group(1)

    stream = distinct_images(120, seed=2)
    def feed() -> None:
        for i in range(0, len(stream), 10):
            shas.update({n: sha(d) for n, d in zip(write_images(dirs["inbox"], stream[i:i + 10], prefix=f"s{i:03d}"),
                                                     stream[i:i + 10])})
    feeder = threading.Thread(target=feed)
    feeder.start()
    acknowledged, busy = 0, 0
    for k in range(40):
        rid = 1 + k % 4
        while True:
            code = b.post(f"/case/{rid}/review", {"csrf_token": token, "agree": "agree", "diagnosis": "nv",
                                                  "action": "none", "reviewer": "dr k", "note": f"verdict {k}"})
            if code == 503:
                busy += 1
                continue
            assert code == 303, code
            acknowledged += 1
            break
    feeder.join()
    wait_for(lambda: len(rows(dirs["db"], "SELECT id FROM results")) + len(rows(dirs["db"], "SELECT id FROM "
             "duplicates")) >= 124, timeout=300, proc=agent, what="the stream screened")
    notes = [r[0] for r in rows(dirs["db"], "SELECT note FROM reviews ORDER BY id")]
    assert notes == [f"verdict {k}" for k in range(40)] and acknowledged == 40
    agent.term()
    assert agent.wait(60) == 0
    assert_exactly_once(dirs, shas)
    print(f"40 verdicts stored while screening 124 images; {busy} 'busy' answers retried")
