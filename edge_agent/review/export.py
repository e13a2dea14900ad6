"""`edge-agent review --export DIR`: a static worklist a colleague opens from a USB stick, no server needed.

DIR/index.html plus DIR/img/ (thumbnails, heatmap overlays as JPEG) and DIR/review.css: relative links only,
no script, no font, no request to anywhere. Thumbnails are decoded in the review worker process
(imaging.py), never here; the heatmap overlay is cam.overlay over that thumbnail. The export holds patient
images: DIR is created 0700 and its files 0600.
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..query import REASON_WORDS, known_labels, show_time
from . import db as rdb
from .files import NotServable, open_inside
from .heatmap import Heatmaps
from .imaging import decode_batch

CHUNK = 16


class ExportError(RuntimeError):
    """The export folder cannot be written; the message says what to do."""


def _write(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0), 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def export(db: Path, out: Path, processed: Path, bundle: Path, trust: Any = None, limit: int = 200,
           flagged_only: bool = True, log: Callable[[str], None] = lambda m: None) -> dict[str, int]:
    """Write the static worklist (the `limit` riskiest cases, flagged ones only by default); returns counts."""
    import cv2

    from ..cam import overlay

    try:
        out.mkdir(parents=True, exist_ok=True, mode=0o700)
        (out / "img").mkdir(exist_ok=True, mode=0o700)
    except OSError as e:
        raise ExportError(f"cannot create the export folder {out} ({e.strerror}); choose a writable folder") from None
    if any(p.name not in ("img", "index.html", "review.css") for p in out.iterdir()):
        raise ExportError(f"{out} already holds other files; export into an empty (or a previous export's) folder")
    roots = (Path(os.path.realpath(processed)),)
    conn = rdb.open_read(db)
    try:
        names = dict(known_labels(conn, bundle).names)
        f = rdb.Filters(flagged=flagged_only, size=limit)
        rows = rdb.worklist(conn, f).rows
        for r in rows:
            full = rdb.result(conn, int(r["id"]))
            r.update(full or {})
        counts = rdb.counts(conn)
    finally:
        conn.close()
    hm = Heatmaps(bundle, trust)
    b = hm.bundle
    n_thumb = n_heat = 0
    for start in range(0, len(rows), CHUNK):
        chunk = rows[start:start + CHUNK]
        opened = []
        for r in chunk:
            try:
                opened.append((int(r["id"]), open_inside(r.get("stored_path"), roots)))
            except NotServable as e:
                r["why_no_image"] = str(e)
        pre = b.preprocessing if b is not None else None
        from ..preprocess import Preprocessing

        dec = decode_batch(opened, pre or Preprocessing(), want_tensor=b is not None) if opened else {}
        for r in chunk:
            d = dec.get(int(r["id"]))
            if d is None:
                continue
            if d.thumbnail is None:
                r["why_no_image"] = d.error or "the image could not be decoded"
                continue
            _write(out / "img" / f"{r['id']}.jpg", d.thumbnail)
            r["thumb"] = f"img/{r['id']}.jpg"
            n_thumb += 1
            why = hm.available(r)
            if why or d.tensor is None:
                r["why_no_heatmap"] = why or d.error
                continue
            m = hm.cam(d.tensor, r["label"]) if r.get("label") in b.labels else None
            if m is None:
                r["why_no_heatmap"] = "no heatmap for this class"
                continue
            thumb = cv2.imdecode(np.frombuffer(d.thumbnail, np.uint8), cv2.IMREAD_COLOR)  # our own JPEG
            ok, buf = cv2.imencode(".jpg", overlay(thumb, m, 0.45, b.preprocessing.resize, d.region),
                                   [cv2.IMWRITE_JPEG_QUALITY, 85])
            if ok:
                _write(out / "img" / f"{r['id']}-heat.jpg", buf.tobytes())
                r["heat"] = f"img/{r['id']}-heat.jpg"
                n_heat += 1
        log(f"{min(start + CHUNK, len(rows))}/{len(rows)} cases")
    css = (Path(__file__).parent / "static" / "review.css").read_bytes()
    _write(out / "review.css", css)
    high = set(b.high_risk_labels) if b is not None else set()
    _write(out / "index.html", _page(rows, names, high, counts).encode("utf-8"))
    return {"cases": len(rows), "thumbnails": n_thumb, "heatmaps": n_heat}


def _label(code: str | None, names: dict[str, str]) -> str:
    if not code:
        return ""
    n = names.get(code, "")
    return f"{code} ({n})" if n and n != code else code


def _bars(probs: dict[str, float], names: dict[str, str], high: set[str]) -> str:
    items = sorted(probs.items(), key=lambda kv: -kv[1])
    out = [f'<svg class="bars" viewBox="0 0 400 {36 * len(items) + 4}" role="img" aria-label="class probabilities">']
    for i, (code, p) in enumerate(items):
        w = round(max(0.0, min(1.0, p)) * 320, 1)
        out.append(f'<g transform="translate(0,{36 * i + 2})"><text x="0" y="12">{html.escape(_label(code, names))}</text>'
                   f'<rect x="0" y="17" width="{w}" height="13" class="{"barhi" if code in high else "bar"}"></rect>'
                   f'<text x="{6 + w}" y="29">{p * 100:.1f} %</text></g>')
    out.append("</svg>")
    return "".join(out)


def _page(rows: list[dict[str, Any]], names: dict[str, str], high: set[str], counts: dict[str, int]) -> str:
    e = html.escape
    cards = []
    for r in rows:
        reasons = ", ".join(REASON_WORDS.get(x, x) for x in r.get("reasons", []))
        img = (f'<img src="{e(r["thumb"])}" alt="case {r["id"]}">' if r.get("thumb") else
               f'<p class="problem">{e(r.get("why_no_image", "no image"))}</p>')
        heat = (f'<img src="{e(r["heat"])}" alt="heatmap of case {r["id"]}">' if r.get("heat") else
                f'<p class="muted">{e(r.get("why_no_heatmap", ""))}</p>' if r.get("thumb") else "")
        rv = r.get("review")
        verdict = (f'{"agree" if rv["agree"] else "disagree"}: {e(_label(rv["diagnosis"], names))}, '
                   f'{e(rdb.ACTIONS.get(rv["action"], rv["action"]))} ({e(rv["reviewer"])})' if rv else "not reviewed")
        p = r.get("p_high_risk")
        cards.append(
            f'<section class="card excase" id="case-{r["id"]}"><h2>#{r["id"]} <span class="name">{e(str(r.get("original_name", "")))}'
            f'</span></h2><div class="expair">{img}{heat}</div>'
            f'<p class="big">{e(_label(r.get("label"), names))} &middot; P(malignant) '
            f'{"-" if p is None else f"{p:.2f}"}</p><p>{e(reasons) or "not flagged"}</p>'
            f'{_bars(r.get("probs", {}), names, high)}'
            f'<p class="muted small">processed {e(show_time(r.get("processed_at")))} &middot; model {e(str(r.get("model_id")))} '
            f'({e(str(r.get("model_variant")))}) &middot; verdict: {verdict}</p></section>')
    meta = json.dumps({"cases": len(rows)})
    return ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src 'self'; style-src 'self'\">"
            "<title>edge-agent review export</title><link rel=\"stylesheet\" href=\"review.css\"></head><body>"
            "<header class=\"top\"><span class=\"brand\">edge-agent review export</span>"
            "<span class=\"disclaimer\">Decision support, not a diagnosis. Contains patient images: keep it private.</span></header><main>"
            f"<p>{counts['flagged']} flagged of {counts['results']} results; {counts['reviewed']} reviewed. "
            f"Showing the {len(rows)} highest-risk cases needing review.</p><!-- {e(meta)} -->"
            + "".join(cards) + "</main></body></html>")
