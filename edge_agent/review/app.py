"""The review web application (Flask): worklist, case page, verdicts, quarantine, export.

Why these rules:
- Only reads, except one INSERT per verdict (db.ReviewWriter); results are never changed.
- Every page is escaped by Jinja2's autoescape; a file name is data, even "<script>".
- Every POST carries a CSRF token (HMAC of a per-browser cookie with a per-process secret), so another web
  page open in the same browser cannot submit verdicts; the Host header must name this server (a DNS
  rebinding page cannot read it); responses say no-store (patient data) and carry a strict
  Content-Security-Policy: nothing is loaded from anywhere but this server.
- No request ends in a traceback: unknown ids, malformed forms, a busy database, a missing file each get a
  page that says what happened and what to do.
"""
from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import logging
import os
import secrets
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from flask import Flask, Response, abort, g, redirect, render_template, request, url_for
from werkzeug.exceptions import HTTPException
from werkzeug.routing import IntegerConverter

from ..query import QUALITY_WORDS, REASON_WORDS, known_labels, show_time
from ..store import StoreError, fs_path
from . import db as rdb
from .files import BROWSER_FORMATS, MIME, NotServable, header_info, open_inside, read_all
from .heatmap import Heatmaps

log = logging.getLogger(__name__)
CSRF_COOKIE = "edge_review_csrf"
MAX_FORM_BYTES = 64 * 1024
MAX_IMAGE_BYTES = 100 << 20
CSP = ("default-src 'none'; img-src 'self' data:; style-src 'self'; script-src 'self'; connect-src 'self'; "
       "form-action 'self'; "
       "frame-ancestors 'none'; base-uri 'none'")


@dataclass
class ReviewConfig:
    db: Path
    processed: Path
    quarantine: Path
    bundle: Path
    trust: Any = None
    allowed_hosts: tuple[str, ...] = ("127.0.0.1", "localhost", "[::1]")
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    max_pixels: int = 64_000_000
    secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))


class RowId(IntegerConverter):
    """A row id in a URL: a non-negative integer SQLite can hold (a longer number is a 404, not an overflow)."""

    def __init__(self, url_map: Any) -> None:
        super().__init__(url_map, min=0, max=2**63 - 1)


def create_app(cfg: ReviewConfig) -> Flask:
    here = Path(__file__).parent
    app = Flask(__name__, template_folder=str(here / "templates"), static_folder=str(here / "static"),
                static_url_path="/static")
    app.config.update(MAX_CONTENT_LENGTH=MAX_FORM_BYTES, MAX_FORM_MEMORY_SIZE=MAX_FORM_BYTES, TRAP_HTTP_EXCEPTIONS=False,
                      PROPAGATE_EXCEPTIONS=False, JSON_SORT_KEYS=False)
    app.url_map.converters["id"] = RowId
    processed = Path(os.path.realpath(cfg.processed))
    quarantine = Path(os.path.realpath(cfg.quarantine))
    heatmaps = Heatmaps(cfg.bundle, cfg.trust, cfg.providers, max_pixels=cfg.max_pixels)
    writer = rdb.ReviewWriter(cfg.db)
    app.extensions["edge_review"] = {"cfg": cfg, "heatmaps": heatmaps}
    labels_cache: dict[str, dict[str, str]] = {}

    # --- plumbing -----------------------------------------------------------------------------

    def conn() -> sqlite3.Connection:
        if "conn" not in g:
            g.conn = rdb.open_read(cfg.db)
        return g.conn

    @app.teardown_request
    def _close(_: BaseException | None) -> None:
        c = g.pop("conn", None)
        if c is not None:
            c.close()

    def labels() -> dict[str, str]:
        if "labels" not in labels_cache or len(labels_cache["labels"]) == 0:
            labels_cache["labels"] = dict(known_labels(conn(), cfg.bundle).names)
        return labels_cache["labels"]

    def csrf_token() -> str:
        nonce = getattr(g, "csrf_nonce", None) or request.cookies.get(CSRF_COOKIE) or ""
        if len(nonce) != 43:
            nonce = secrets.token_urlsafe(32)
            g.new_csrf_nonce = nonce
        g.csrf_nonce = nonce
        return hmac.new(cfg.secret, nonce.encode(), hashlib.sha256).hexdigest()

    def csrf_ok() -> bool:
        nonce = request.cookies.get(CSRF_COOKIE) or ""
        sent = str(request.form.get("csrf_token", ""))
        want = hmac.new(cfg.secret, nonce.encode(), hashlib.sha256).hexdigest()
        return bool(nonce) and hmac.compare_digest(sent, want)

    @app.before_request
    def _check_host() -> Response | None:
        host = (request.host or "").rsplit(":", 1)[0] if not (request.host or "").startswith("[") else \
            (request.host or "").split("]")[0] + "]"
        if host not in cfg.allowed_hosts:
            return page_error(421, "Wrong address", f"This review app answers only at {', '.join(cfg.allowed_hosts)}; "
                              "open it by that address (a page that reaches it under another name is refused).")
        return None

    @app.after_request
    def _headers(resp: Response) -> Response:
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["Cross-Origin-Resource-Policy"] = "same-origin"
        if not request.path.startswith("/static/"):
            resp.headers["Cache-Control"] = "no-store"
        nonce = getattr(g, "new_csrf_nonce", None)
        if nonce:
            resp.set_cookie(CSRF_COOKIE, nonce, httponly=True, samesite="Strict", path="/")
        return resp

    @app.context_processor
    def _ctx() -> dict[str, Any]:
        return {"csrf_token": csrf_token, "show_time": show_time, "reason_words": REASON_WORDS,
                "quality_words": QUALITY_WORDS, "actions": rdb.ACTIONS, "label_name": label_name}

    def label_name(code: str | None) -> str:
        if not code:
            return ""
        name = labels().get(code, "")
        return f"{code} ({name})" if name and name != code else str(code)

    def page_error(status: int, title: str, message: str) -> Response:
        try:
            body = render_template("error.html", title=title, message=message, status=status)
        except Exception:  # noqa: BLE001 - the error page itself must not fail
            from markupsafe import escape
            body = f"<!doctype html><title>{escape(title)}</title><h1>{escape(title)}</h1><p>{escape(message)}</p>"
        return Response(body, status=status, mimetype="text/html")

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException) -> Response:
        words = {404: ("Not found", "There is no such page or case. Go back to the worklist."),
                 405: ("Not allowed", "This address does not take that kind of request. Go back to the worklist."),
                 413: ("Too large", "The form was larger than a verdict can be (64 KB). Shorten the note and "
                                    "submit again."),
                 400: ("Bad request", "The request could not be read. Go back, reload the page and try again.")}
        title, msg = words.get(e.code or 500, (e.name, e.description or ""))
        return page_error(e.code or 500, title, msg)

    @app.errorhandler(Exception)
    def _any(e: Exception) -> Response:
        if isinstance(e, StoreError):
            return page_error(503, "Database not available", str(e))
        if isinstance(e, sqlite3.OperationalError) and ("locked" in str(e).lower() or "busy" in str(e).lower()):
            return page_error(503, "Database busy", "The results database is busy (the screening agent or another "
                              "program is writing to it). Nothing was lost; reload the page in a few seconds.")
        if isinstance(e, sqlite3.DatabaseError):
            return page_error(503, "Database error", f"The results database could not be read ({e}). Check that "
                              "the agent is running and the database is intact (`edge-agent status`).")
        log.exception("review app: unexpected error on %s", request.path)
        return page_error(500, "Something went wrong", "The page could not be made; the error is in the review "
                          "app's log. Nothing was changed. Go back to the worklist and try again.")

    def filters() -> rdb.Filters:
        return rdb.Filters.parse(request.args, labels())

    # --- worklist -----------------------------------------------------------------------------

    @app.get("/")
    def worklist() -> str:
        f = filters()
        page = rdb.worklist(conn(), f, after=request.args.get("after", ""), before=request.args.get("before", ""),
                            end=request.args.get("end") == "1")
        q = f.query_args()
        nav = {"first": _url("worklist", q), "last": _url("worklist", {**q, "end": "1"}),
               "next": None if page.last or not page.rows else _url("worklist", {**q, "after": rdb.encode_key(page.rows[-1])}),
               "prev": None if page.first or not page.rows else _url("worklist", {**q, "before": rdb.encode_key(page.rows[0])})}
        raw = {k: str(request.args.get(k, "")) for k in ("since", "until")}
        return render_template("worklist.html", page=page, f=f, q=q, nav=nav, counts=rdb.counts(conn()),
                               labels=labels(), raw=raw, qs=urlencode(q), reviewed_choices=rdb.REVIEWED_CHOICES,
                               sizes=rdb.PAGE_SIZES)

    def _url(endpoint: str, args: dict[str, str], **kw: Any) -> str:
        return url_for(endpoint, **kw) + ("?" + urlencode(args) if args else "")

    # --- case ------------------------------------------------------------------------------------

    def case_or_404(rid: int) -> dict[str, Any]:
        row = rdb.result(conn(), rid)
        if row is None:
            abort(404)
        return row

    def image_state(row: dict[str, Any]) -> tuple[bool, str]:
        """(can the browser show it, why not)."""
        if row.get("file_state") == "pruned":
            return False, (f"the image was removed by retention (pruned {show_time(row.get('pruned_at'))}); the "
                           "result, its probabilities and its reviews remain")
        try:
            f = open_inside(row.get("stored_path"), (processed,))
        except NotServable as e:
            return False, str(e)
        os.close(f.fd)
        fmt = (row.get("image_format") or "").lower()
        if fmt and fmt not in BROWSER_FORMATS:
            return False, f"{fmt.upper()} images cannot be shown by a browser; open the file {f.path.name} with an image viewer"
        return True, ""

    @app.get("/case/<id:rid>")
    def case(rid: int, form: dict[str, Any] | None = None, problems: dict[str, str] | None = None,
             saved: bool = False, status: int = 200) -> Response:
        row = case_or_404(rid)
        f = filters()
        prev_id, next_id = rdb.neighbours(conn(), f, row)
        q = f.query_args()
        shown, why_no_image = image_state(row)
        why_no_heatmap = heatmaps.available(row) if shown else "no heatmap: " + why_no_image
        classes = heatmaps.classes(row) if not why_no_heatmap else []
        b = heatmaps.bundle
        rule = b.preprocessing.resize if b is not None else "shorter_side_center_crop"
        history = rdb.reviews_of(conn(), rid)
        names = labels()
        probs = sorted(row["probs"].items(), key=lambda kv: -kv[1])
        high = set(b.high_risk_labels) if b is not None else set()
        body = render_template(
            "case.html", r=row, q=q, qs=urlencode(q), prev_id=prev_id, next_id=next_id, shown=shown,
            why_no_image=why_no_image, why_no_heatmap=why_no_heatmap, classes=classes, crop_rule=rule,
            history=history, labels=names, probs=probs, high=high, form=form or {}, problems=problems or {},
            saved=saved or request.args.get("saved") == "1", reviewer=request.cookies.get("edge_review_name", ""))
        return Response(body, status=status, mimetype="text/html")

    @app.get("/case/<id:rid>/full")
    def full(rid: int) -> str:
        row = case_or_404(rid)
        shown, why = image_state(row)
        return render_template("full.html", r=row, shown=shown, why_no_image=why, qs=urlencode(filters().query_args()))

    @app.post("/case/<id:rid>/review")
    def review(rid: int) -> Response:
        if not csrf_ok():
            return page_error(403, "Form expired", "The verdict form could not be verified (its security token is "
                              "missing or stale, e.g. after the review app restarted). Nothing was saved: go back, "
                              "reload the case page and submit the verdict again.")
        row = case_or_404(rid)
        form = {k: str(request.form.get(k, ""))[:5000] for k in
                ("agree", "diagnosis", "action", "histopathology", "note", "reviewer")}
        try:
            verdict = rdb.parse_verdict(request.form, labels())
        except rdb.VerdictError as e:
            return case(rid, form=form, problems=e.problems, status=400)
        try:
            writer.add(int(row["id"]), verdict)
        except rdb.DatabaseBusy:
            return case(rid, form=form, problems={"form": "The database is busy (the screening agent is writing). "
                        "Your verdict was NOT saved yet; press Save again in a few seconds."}, status=503)
        except rdb.VerdictError as e:
            return case(rid, form=form, problems=e.problems, status=400)
        q = filters().query_args()
        resp = redirect(_url("case", {**q, "saved": "1"}, rid=rid), code=303)
        resp.set_cookie("edge_review_name", verdict["reviewer"][:120], httponly=True, samesite="Strict", path="/",
                        max_age=30 * 24 * 3600)
        return resp

    # --- files ---------------------------------------------------------------------------------------

    @app.get("/image/<id:rid>")
    def image(rid: int) -> Response:
        row = case_or_404(rid)
        try:
            f = open_inside(row.get("stored_path"), (processed,))
            data = read_all(f, MAX_IMAGE_BYTES)
        except NotServable as e:
            return page_error(e.status, "Image not available", str(e))
        from ..decode import sniff

        fmt = sniff(data[:16])
        if fmt not in BROWSER_FORMATS:
            return page_error(415, "Image not shown", "This file is not in a format a browser shows (or not an "
                              "image any more); open it with an image viewer.")
        return Response(data, mimetype=MIME[fmt], headers={"Cache-Control": "private, max-age=300"})

    @app.get("/heatmap/<id:rid>/<label>.png")
    def heatmap(rid: int, label: str) -> Response:
        row = case_or_404(rid)
        hm = heatmaps.get(row, label, (processed,))
        if hm.png is None:
            return page_error(404, "No heatmap", hm.why_not)
        return Response(hm.png, mimetype="image/png")

    # --- quarantine ---------------------------------------------------------------------------------------

    @app.get("/quarantine")
    def quarantine_list() -> str:
        try:
            before = int(request.args.get("before", "0") or 0)
        except ValueError:
            before = 0
        rows = rdb.quarantine_rows(conn(), 100, before if before > 0 else None)
        return render_template("quarantine.html", rows=rows, counts=rdb.counts(conn()),
                               more=rows[-1]["id"] if len(rows) == 100 else None)

    @app.get("/quarantine/<id:qid>")
    def quarantine_item(qid: int) -> str:
        row = rdb.quarantine_row(conn(), qid)
        if row is None:
            abort(404)
        try:
            info: dict[str, Any] | None = header_info(row.get("stored_path"), (quarantine,))
            why = ""
        except NotServable as e:
            info, why = None, str(e)
        return render_template("quarantine_item.html", q=row, info=info, why=why, where=fs_path(row.get("stored_path")))

    # --- export --------------------------------------------------------------------------------------------

    @app.get("/export.<fmt>")
    def export(fmt: str) -> Response:
        what = request.args.get("what", "results")
        if fmt not in ("csv", "json") or what not in ("results", "reviews"):
            abort(404)
        rows = rdb.export_rows(conn(), only_reviewed=request.args.get("reviewed") == "1") if what == "results" \
            else rdb.all_reviews(conn())
        name = f"edge-review-{what}.{fmt}"
        if fmt == "json":
            for r in rows:
                if isinstance(r.get("probabilities"), str):
                    try:
                        r["probabilities"] = json.loads(r["probabilities"])
                    except ValueError:
                        pass
            data = json.dumps(rows, indent=1, default=str)
            return Response(data, mimetype="application/json",
                            headers={"Content-Disposition": f'attachment; filename="{name}"'})
        buf = io.StringIO()
        cols = list(rows[0]) if rows else ["id"]
        w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        for r in rows:  # a cell starting with = + - @ would be a formula in a spreadsheet: prefix it
            w.writerow({k: ("'" + v if isinstance(v, str) and v[:1] in "=+-@\t\r" else v) for k, v in r.items()})
        return Response(buf.getvalue(), mimetype="text/csv",
                        headers={"Content-Disposition": f'attachment; filename="{name}"'})

    @app.template_filter("pct")
    def pct(p: Any) -> str:
        return f"{float(p) * 100:.1f} %" if isinstance(p, (int, float)) else "-"

    @app.template_filter("prob")
    def prob(p: Any) -> str:
        return f"{float(p):.2f}" if isinstance(p, (int, float)) and p >= 0 else "-"

    return app
