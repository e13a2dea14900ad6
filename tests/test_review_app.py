"""The review web app over a real screened site: worklist, case page, verdicts, files, errors, export.

Every request goes through Flask's test client (the real app, real SQLite file, real image files); no page
may show a traceback, serve a file outside processed/quarantine, or store a verdict without its CSRF token.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import sqlite3
from pathlib import Path

import pytest

pytest.importorskip("flask", reason="the review app needs the [review] extra (Flask)")

from conftest import rows  # noqa: E402
from review_site import HOST, SCRIPT_FILE, add_synthetic_results, csrf, make_site, review_app  # noqa: E402


@pytest.fixture
def site(dirs, bundle_dir):
    return make_site(dirs, bundle_dir)


@pytest.fixture
def client(site):
    return review_app(site).test_client()


def get(client, url: str, **kw):
    r = client.get(url, headers=HOST, **kw)
    assert b"Traceback" not in r.data
    return r


def verdict(**kw) -> dict[str, str]:
    return {"agree": "agree", "diagnosis": "mel", "action": "excise", "reviewer": "Dr. Ada", "note": "",
            "histopathology": "", **kw}


def ids_on(page: str) -> list[int]:
    return [int(x) for x in re.findall(r'class="case-link">(\d+)<', page)]


def test_worklist_is_in_risk_order_with_counts(client, site) -> None:
    page = get(client, "/").get_data(as_text=True)
    order = [r[0] for r in rows(site.db, "SELECT id FROM results ORDER BY needs_review DESC, "
                                         "coalesce(p_high_risk, -1) DESC, id DESC")]
    assert ids_on(page) == order and len(order) == 9
    flagged = rows(site.db, "SELECT count(*) FROM results WHERE needs_review = 1")[0][0]
    assert f"<b>{flagged}</b> flagged, not yet reviewed" in page
    assert "<b>1</b> quarantined" in page


def test_file_names_are_escaped_everywhere(client, site) -> None:
    rid = rows(site.db, "SELECT id FROM results WHERE original_name = ?", (SCRIPT_FILE,))[0][0]
    qid = rows(site.db, "SELECT id FROM quarantine")[0][0]
    for url in ("/", f"/case/{rid}", f"/case/{rid}/full", "/quarantine", f"/quarantine/{qid}"):
        page = get(client, url).get_data(as_text=True)
        assert "<script>alert" not in page and "<b>notes" not in page, url
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;script&gt;.jpg" in get(client, f"/case/{rid}").get_data(as_text=True)
    assert "&lt;b&gt;notes&lt;b&gt;.txt" in get(client, "/quarantine").get_data(as_text=True)


def test_security_headers_and_no_external_resources(client) -> None:
    r = get(client, "/")
    assert "default-src 'none'" in r.headers["Content-Security-Policy"] and r.headers["Cache-Control"] == "no-store"
    page = r.get_data(as_text=True)
    assert not re.search(r'(src|href)="(https?:)?//', page)
    for asset in ("/static/review.css", "/static/review.js"):
        body = get(client, asset).get_data(as_text=True)
        assert "http://" not in body and "https://" not in body and "@import" not in body


def test_case_page_shows_everything_and_says_why_no_heatmap(client, site) -> None:
    r = rows(site.db, "SELECT * FROM results WHERE needs_review = 1 ORDER BY p_high_risk DESC LIMIT 1")[0]
    page = get(client, f"/case/{r['id']}").get_data(as_text=True)
    probs = json.loads(r["probabilities"])
    assert page.count("<rect ") == len(probs) == 7  # one bar per class
    for code in probs:
        assert f">{code} (" in page
    assert r["model_id"] in page and r["model_variant"] in page and r["sha256"] in page
    assert "Sharpness" in page and str(r["sharpness"]) in page
    assert 'id="photo"' in page
    assert 'id="heatmap"' in page or "no heatmap: this bundle has no feature output (format" in page
    img = get(client, f"/image/{r['id']}")
    assert img.status_code == 200 and img.mimetype == "image/jpeg"
    assert img.data == Path(r["stored_path"]).read_bytes()


def test_prev_next_follow_the_worklist_order_and_filters(client, site) -> None:
    order = ids_on(get(client, "/").get_data(as_text=True))
    page = get(client, f"/case/{order[1]}").get_data(as_text=True)
    assert f'href="/case/{order[0]}" rel="prev"' in page and f'href="/case/{order[2]}" rel="next"' in page
    first = get(client, f"/case/{order[0]}").get_data(as_text=True)
    assert 'rel="prev"' not in first
    flagged = ids_on(get(client, "/?flagged=1").get_data(as_text=True))
    if len(flagged) >= 2:
        page = get(client, f"/case/{flagged[0]}?flagged=1").get_data(as_text=True)
        assert f'href="/case/{flagged[1]}?flagged=1" rel="next"' in page


def test_keyset_paging_visits_every_row_once_forwards_and_backwards(client, site) -> None:
    add_synthetic_results(site.db, 500)
    want = [r[0] for r in rows(site.db, "SELECT id FROM results ORDER BY needs_review DESC, "
                                        "coalesce(p_high_risk, -1) DESC, id DESC")]
    seen: list[int] = []
    url = "/?size=25"
    pages = []
    while url:
        page = get(client, url).get_data(as_text=True)
        pages.append(page)
        seen += ids_on(page)
        m = re.search(r'href="([^"]+)" rel="next"', page)
        url = m.group(1).replace("&amp;", "&") if m else ""
    assert seen == want
    back: list[int] = []
    page = get(client, "/?size=25&end=1").get_data(as_text=True)
    while True:
        back = ids_on(page) + back
        m = re.search(r'href="([^"]+)" rel="prev"', page)
        if not m:
            break
        page = get(client, m.group(1).replace("&amp;", "&")).get_data(as_text=True)
    assert back == want
    assert f"{len(want)} cases match" in pages[0]


def test_filters_label_reason_reviewed_date(client, site) -> None:
    label = rows(site.db, "SELECT label FROM results LIMIT 1")[0][0]
    got = ids_on(get(client, f"/?label={label}").get_data(as_text=True))
    assert set(got) == {r[0] for r in rows(site.db, "SELECT id FROM results WHERE label = ?", (label,))}
    got = ids_on(get(client, "/?reason=high_risk").get_data(as_text=True))
    assert set(got) == {r[0] for r in rows(site.db, "SELECT id FROM results WHERE review_reasons LIKE '%high_risk%'")}
    assert ids_on(get(client, "/?since=2999-01-01").get_data(as_text=True)) == []
    from datetime import date

    today = date.today().isoformat()  # "until <today>" includes today (local dates, as typed)
    assert len(ids_on(get(client, f"/?since={today}&until={today}").get_data(as_text=True))) == 9
    assert ids_on(get(client, "/?until=2000-01-01").get_data(as_text=True)) == []
    assert len(ids_on(get(client, "/?since=7d").get_data(as_text=True))) == 9
    for bad in ("/?label=nonsense", "/?reason=<x>", "/?reviewed=maybe", "/?since=last+tuesday"):
        r = get(client, bad)
        assert r.status_code == 200 and 'class="problem"' in r.get_data(as_text=True), bad
    for junk in ("/?after=1~x~3", "/?before=%00", "/?size=-4", "/?after=" + "9" * 5000):
        assert get(client, junk).status_code == 200, junk


def test_verdict_is_stored_append_only_and_shown(client, site) -> None:
    rid = ids_on(get(client, "/").get_data(as_text=True))[0]
    tok = csrf(client, rid)
    r = client.post(f"/case/{rid}/review", headers=HOST, data={**verdict(), "csrf_token": tok})
    assert r.status_code == 303
    page = get(client, r.headers["Location"]).get_data(as_text=True)
    assert "Verdict saved." in page and "Dr. Ada" in page
    r = client.post(f"/case/{rid}/review", headers=HOST, data={**verdict(agree="disagree", diagnosis="other",
                    action="refer", note="seborrhoeic keratosis <b>", histopathology="pending"), "csrf_token": tok})
    assert r.status_code == 303
    got = rows(site.db, "SELECT * FROM reviews WHERE result_id = ? ORDER BY id", (rid,))
    assert [(g["agree"], g["diagnosis"], g["action"]) for g in got] == [(1, "mel", "excise"), (0, "other", "refer")]
    assert got[0]["result_sha256"] == rows(site.db, "SELECT sha256 FROM results WHERE id = ?", (rid,))[0][0]
    wl = get(client, "/").get_data(as_text=True)
    assert "disagree: other, refer" in wl
    assert "seborrhoeic keratosis &lt;b&gt;" in get(client, f"/case/{rid}").get_data(as_text=True)
    assert ids_on(get(client, "/?reviewed=yes").get_data(as_text=True)) == [rid]
    assert rid not in ids_on(get(client, "/?reviewed=no").get_data(as_text=True))


@pytest.mark.parametrize("bad,field", [
    ({"agree": "maybe"}, "agree"), ({"diagnosis": "cancer"}, "diagnosis"), ({"action": "burn"}, "action"),
    ({"reviewer": "   "}, "reviewer"), ({"diagnosis": "other", "note": ""}, "note"),
    ({"note": "x" * 4001}, "note"), ({"reviewer": "a\x00b"}, "reviewer"),
])
def test_malformed_verdicts_are_refused_field_by_field(client, site, bad, field) -> None:
    rid = 1
    tok = csrf(client, rid)
    r = client.post(f"/case/{rid}/review", headers=HOST, data={**verdict(**bad), "csrf_token": tok})
    assert r.status_code == 400
    page = r.get_data(as_text=True)
    assert 'class="problem"' in page and "Traceback" not in page
    assert rows(site.db, "SELECT count(*) FROM reviews")[0][0] == 0


def test_posts_without_a_valid_csrf_token_store_nothing(client, site) -> None:
    tok = csrf(client, 1)
    for data in (verdict(), {**verdict(), "csrf_token": "0" * 64}, {**verdict(), "csrf_token": tok[:-1] + ("1" if tok[-1] == "0" else "0")}):
        r = client.post("/case/1/review", headers=HOST, data=data)
        assert r.status_code == 403 and "Nothing was saved" in r.get_data(as_text=True)
    other = review_app(site).test_client()  # another browser: its own cookie, our token does not fit it
    assert other.post("/case/1/review", headers=HOST, data={**verdict(), "csrf_token": tok}).status_code == 403
    assert rows(site.db, "SELECT count(*) FROM reviews")[0][0] == 0


def test_unknown_ids_and_odd_requests_get_pages_not_tracebacks(client, site) -> None:
    tok = csrf(client, 1)
    for url in ("/case/999999", "/case/0/full", "/image/424242", "/heatmap/999/mel.png", "/quarantine/77",
                "/case/abc", "/nothing", "/export.xml", "/export.csv?what=passwords", "/case/99999999999999999999999"):
        r = get(client, url)
        assert r.status_code == 404 and "<h1>" in r.get_data(as_text=True), url
    assert get(client, "/case/1/review").status_code == 405
    r = client.post("/case/999999/review", headers=HOST, data={**verdict(), "csrf_token": tok})
    assert r.status_code == 404
    r = client.post("/case/1/review", headers=HOST, data=b"\xff\xfe garbage", content_type="multipart/form-data")
    assert r.status_code in (400, 403) and "Traceback" not in r.get_data(as_text=True)
    r = client.post("/case/1/review", headers=HOST, data={**verdict(note="x" * 100_000), "csrf_token": tok})
    assert r.status_code == 413 and "Too large" in r.get_data(as_text=True)
    assert rows(site.db, "SELECT count(*) FROM reviews")[0][0] == 0


def test_a_foreign_host_header_is_refused(client) -> None:
    r = client.get("/", headers={"Host": "evil.example:8765"})
    assert r.status_code == 421 and "answers only at" in r.get_data(as_text=True)


def _point_result_at(db: Path, rid: int, path: str) -> None:
    conn = sqlite3.connect(db)
    conn.execute("UPDATE results SET stored_path = ? WHERE id = ?", (path, rid))
    conn.commit()
    conn.close()


def test_files_outside_processed_are_never_served(client, site, tmp_path) -> None:
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(Path(rows(site.db, "SELECT stored_path FROM results WHERE id = 1")[0][0]).read_bytes())
    processed = site.dirs["processed"]
    link = processed / "link.jpg"
    os.symlink(secret, link)
    cases = {2: str(secret), 3: str(processed / ".." / ".." / secret.relative_to(tmp_path.parent)),
             4: str(link), 5: "../../../../etc/passwd", 6: "/etc/passwd",
             7: str(site.dirs["quarantine"] / "x.jpg")}  # quarantine is not an image root
    for rid, path in cases.items():
        _point_result_at(site.db, rid, path)
    for rid in cases:
        r = get(client, f"/image/{rid}")
        assert r.status_code in (403, 404) and r.mimetype == "text/html", (rid, cases[rid])
        assert b"\xff\xd8" not in r.data and b"root:" not in r.data
        page = get(client, f"/case/{rid}").get_data(as_text=True)
        assert 'id="no-image"' in page and 'id="photo"' not in page
        assert get(client, f"/heatmap/{rid}/mel.png").status_code == 404


def test_a_symlink_in_quarantine_does_not_leak_its_target(client, site, tmp_path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("root:x:0:0:secret")
    qdir = site.dirs["quarantine"]
    os.symlink(outside, qdir / "evil")
    conn = sqlite3.connect(site.db)
    qid = conn.execute("SELECT id FROM quarantine").fetchone()[0]
    conn.execute("UPDATE quarantine SET stored_path = ? WHERE id = ?", (str(qdir / "evil"), qid))
    conn.commit()
    conn.close()
    page = get(client, f"/quarantine/{qid}").get_data(as_text=True)
    assert "secret" not in page and "outside the processed and quarantine folders" in page


def test_quarantine_page_shows_reason_and_header(client, site) -> None:
    q = rows(site.db, "SELECT * FROM quarantine")[0]
    page = get(client, "/quarantine").get_data(as_text=True)
    assert "not a supported image" in page
    item = get(client, f"/quarantine/{q['id']}").get_data(as_text=True)
    assert "Header declares" in item and "6e 6f 74 20 61 6e" in item and f"{len('not an image')} bytes" in item


def test_missing_image_file_says_so(client, site) -> None:
    r = rows(site.db, "SELECT id, stored_path FROM results LIMIT 1")[0]
    os.unlink(r["stored_path"])
    page = get(client, f"/case/{r['id']}").get_data(as_text=True)
    assert "is missing: it was moved or pruned" in page and "probabilities remain" in page
    img = get(client, f"/image/{r['id']}")
    assert img.status_code == 404 and "moved or pruned" in img.get_data(as_text=True)


def test_locked_database_verdict_is_not_lost_silently(client, site) -> None:
    tok = csrf(client, 1)
    locker = sqlite3.connect(site.db, isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # what the agent's writer holds during a commit
    try:
        page = get(client, "/").get_data(as_text=True)  # reads go on (WAL)
        assert ids_on(page)
        r = client.post("/case/1/review", headers=HOST, data={**verdict(note="keep me"), "csrf_token": tok})
        assert r.status_code == 503
        body = r.get_data(as_text=True)
        assert "NOT saved" in body and "keep me" in body  # the form keeps what was typed
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert rows(site.db, "SELECT count(*) FROM reviews")[0][0] == 0
    r = client.post("/case/1/review", headers=HOST, data={**verdict(note="keep me"), "csrf_token": tok})
    assert r.status_code == 303 and rows(site.db, "SELECT note FROM reviews")[0][0] == "keep me"


def test_a_database_that_vanished_gives_a_page(client, site) -> None:
    os.rename(site.db, site.db.with_suffix(".moved"))
    r = get(client, "/")
    assert r.status_code == 503 and "no database" in r.get_data(as_text=True)


def test_export_csv_and_json_have_results_with_latest_verdicts(client, site) -> None:
    tok = csrf(client, 1)
    client.post("/case/1/review", headers=HOST, data={**verdict(note="=HYPERLINK(\"x\")"), "csrf_token": tok})
    r = get(client, "/export.csv")
    assert r.status_code == 200 and "attachment" in r.headers["Content-Disposition"]
    table = list(csv.DictReader(io.StringIO(r.get_data(as_text=True))))
    assert len(table) == 9
    one = next(t for t in table if t["id"] == "1")
    assert one["diagnosis"] == "mel" and one["reviewer"] == "Dr. Ada"
    assert one["review_note"].startswith("'=")  # no spreadsheet formula
    data = json.loads(get(client, "/export.json").get_data(as_text=True))
    assert len(data) == 9 and isinstance(data[0]["probabilities"], dict)
    hist = list(csv.DictReader(io.StringIO(get(client, "/export.csv?what=reviews").get_data(as_text=True))))
    assert len(hist) == 1 and hist[0]["result_id"] == "1"


def test_a_pruned_image_says_retention_removed_it(client, site) -> None:
    conn = sqlite3.connect(site.db)
    conn.execute("UPDATE results SET file_state = 'pruned', pruned_at = '2026-11-01T10:00:00.000Z' WHERE id = 1")
    conn.commit()
    conn.close()
    page = get(client, "/case/1").get_data(as_text=True)
    assert "removed by retention" in page and 'id="photo"' not in page
    assert "probabilities and its reviews remain" in page
