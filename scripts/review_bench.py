#!/usr/bin/env python3
"""Time the review app's worklist with many results (issue 12: "paging that stays fast with 100,000 rows").

    python scripts/review_bench.py [--rows 100000] [--repeats 30] [--db PATH]

Builds a results database with the agent's own schema (store.migrate) and N synthetic results (30 % flagged,
5 % reviewed, 7 labels), then requests worklist pages through the real Flask app (test client: the whole
request - routing, SQL, template - without the network) and prints p50/p95 per page:
first page, a page in the middle (reached by its keyset cursor, as the "next" links do), the last page,
filtered pages, and a case page. Also prints SQLite's query plan to show the worklist index is used.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

LABELS = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
HIGH = ["mel", "bcc", "akiec"]


def build(db: Path, n: int, seed: int = 0) -> None:
    from edge_agent.store import connect, migrate

    conn = connect(db)
    migrate(conn, LABELS)
    rnd = random.Random(seed)
    rows = []
    t0 = 1_700_000_000
    for i in range(n):
        raw = [rnd.random() ** 3 for _ in LABELS]
        s = sum(raw)
        probs = {lab: round(v / s, 4) for lab, v in zip(LABELS, raw)}
        label = max(probs, key=probs.get)
        p_high = round(sum(probs[x] for x in HIGH), 4)
        flagged = int(p_high > 0.55 or rnd.random() < 0.05)
        reasons = ",".join(x for x, on in (("high_risk", p_high > 0.55), ("low_confidence", probs[label] < 0.4)) if on)
        ts = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(t0 + i * 30))
        rows.append((f"{i:064x}", f"img_{i:06d}.jpg", f"/inbox/img_{i:06d}.jpg", f"/processed/img_{i:06d}.jpg",
                     "moved", ts, ts, "bench-model", "int8", 0, label, label, probs[label], p_high,
                     json.dumps(probs), flagged, reasons if flagged else "", "", 50.0, 120.0, 0.0, 0.0, "jpeg",
                     1024, 768, 1, 0, 12.0, *[probs[x] for x in LABELS]))
    cols = ("sha256, original_name, original_path, stored_path, file_state, received_at, processed_at, model_id, "
            "model_variant, fallback, label, label_name, confidence, p_high_risk, probabilities, needs_review, "
            "review_reasons, quality_issues, sharpness, brightness, clipped_dark, clipped_bright, image_format, "
            "width, height, decode_reduction, spot_checked, latency_ms, " + ", ".join(f"p_{x}" for x in LABELS))
    with conn:
        conn.executemany(f"INSERT INTO results ({cols}) VALUES ({', '.join('?' for _ in cols.split(','))})", rows)
        conn.executemany("INSERT INTO reviews (result_id, result_sha256, reviewed_at, reviewer, agree, diagnosis, "
                         "action) VALUES (?, 'x', '2026-11-28T10:00:00.000Z', 'bench', 1, 'nv', 'none')",
                         [(i,) for i in rnd.sample(range(1, n + 1), n // 20)])
    conn.execute("ANALYZE")
    conn.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--db", type=Path)
    a = ap.parse_args()
    tmp = tempfile.TemporaryDirectory(prefix="review-bench-")
    db = a.db or Path(tmp.name) / "results.db"
    t = time.perf_counter()
    if not db.exists():
        build(db, a.rows)
    print(f"database: {db} ({a.rows} results, built in {time.perf_counter() - t:.1f} s)")

    from edge_agent.review import db as rdb
    from edge_agent.review.app import ReviewConfig, create_app

    app = create_app(ReviewConfig(db=db, processed=Path(tmp.name), quarantine=Path(tmp.name),
                                  bundle=Path(tmp.name) / "no-bundle"))
    client = app.test_client()
    conn = rdb.open_read(db)
    mid = conn.execute(f"SELECT {rdb._LIST_COLS} FROM results{rdb._ORDER_DESC} LIMIT 1 OFFSET ?",
                       (a.rows // 2,)).fetchone()
    plan = conn.execute(f"EXPLAIN QUERY PLAN SELECT {rdb._LIST_COLS} FROM results WHERE needs_review = ? AND "
                        f"coalesce(p_high_risk, -1.0) < ?{rdb._ORDER_DESC} LIMIT 51", (1, 0.5)).fetchall()
    conn.close()
    print("query plan (middle page):", "; ".join(r[3] for r in plan))
    pages = {"first page": "/", "middle page (cursor)": f"/?after={rdb.encode_key(dict(mid))}",
             "last page": "/?end=1", "flagged, not reviewed": "/?flagged=1&reviewed=no",
             "label=mel, reason=high_risk": "/?label=mel&reason=high_risk",
             "last page, flagged + not reviewed": "/?flagged=1&reviewed=no&end=1",
             "case page (middle)": f"/case/{int(mid['id'])}"}
    print(f"{'page':36} {'p50 ms':>8} {'p95 ms':>8}  (repeats: {a.repeats}; 50 rows per page)")
    for name, url in pages.items():
        r = client.get(url, headers={"Host": "127.0.0.1"})
        assert r.status_code == 200, (url, r.status_code)
        times = []
        for _ in range(a.repeats):
            t = time.perf_counter()
            r = client.get(url, headers={"Host": "127.0.0.1"})
            times.append((time.perf_counter() - t) * 1000)
            assert r.status_code == 200
        times.sort()
        p95 = times[min(len(times) - 1, int(round(0.95 * (len(times) - 1))))]
        print(f"{name:36} {statistics.median(times):8.1f} {p95:8.1f}")


if __name__ == "__main__":
    main()
