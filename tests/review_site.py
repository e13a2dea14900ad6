"""A real screened site for the review app tests: the agent scans real images (one named with <script>) and a
text file it quarantines; the review app is then built over that database and those folders."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bundle_factory import TEST_PUBLIC_KEY
from conftest import EXAMPLES, scan_now

SCRIPT_FILE = "<script>alert('x')<script>.jpg"
HOST = {"Host": "127.0.0.1:8765"}


@dataclass
class Site:
    dirs: dict[str, Path]
    bundle: Path

    @property
    def db(self) -> Path:
        return self.dirs["db"]


def make_site(dirs: dict[str, Path], bundle: Path, n: int = 8, more_quarantine: bool = False) -> Site:
    images = sorted(EXAMPLES.glob("*.jpg"))
    for p in images[:n]:
        shutil.copy(p, dirs["inbox"] / p.name)
    shutil.copy(images[n], dirs["inbox"] / SCRIPT_FILE)
    (dirs["inbox"] / "<b>notes<b>.txt").write_text("not an image")
    if more_quarantine:  # a few more kinds of refusal, for the quarantine page's screenshot
        import cv2
        import numpy as np

        (dirs["inbox"] / "referral letter.pdf").write_bytes(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< >>\nendobj\n")
        ok, png = cv2.imencode(".png", np.full((12, 16, 3), 128, np.uint8))
        (dirs["inbox"] / "icon.png").write_bytes(png.tobytes())
        ok, big = cv2.imencode(".png", np.zeros((40, 40, 3), np.uint8))
        data = bytearray(big.tobytes())
        data[16:24] = (100000).to_bytes(4, "big") * 2  # the header claims 100000 x 100000 pixels
        (dirs["inbox"] / "bomb.png").write_bytes(bytes(data))
    code, _ = scan_now(dirs, bundle)
    assert code == 0
    return Site(dirs, bundle)


def review_app(site: Site, **kw: Any):
    from edge_agent.review import db as rdb
    from edge_agent.review.app import ReviewConfig, create_app
    from edge_agent.signing import make_trust

    rdb.ensure_schema(site.db)
    cfg = ReviewConfig(db=site.db, processed=site.dirs["processed"], quarantine=site.dirs["quarantine"],
                       bundle=site.bundle, trust=make_trust((TEST_PUBLIC_KEY,), False), **kw)
    return create_app(cfg)


def csrf(client: Any, rid: int) -> str:
    """The CSRF token from the case page's form (and the cookie it sets in the client)."""
    import re

    page = client.get(f"/case/{rid}", headers=HOST).get_data(as_text=True)
    m = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page)
    assert m, "no CSRF token in the verdict form"
    return m.group(1)


def add_synthetic_results(db: Path, n: int, seed: int = 0) -> None:
    """n more result rows (copies of result #1 with their own id, sha256, risk and flag), for paging tests."""
    import random
    import sqlite3

    rnd = random.Random(seed)
    conn = sqlite3.connect(db)
    cols = [r[1] for r in conn.execute("PRAGMA table_info(results)") if r[1] != "id"]
    base = dict(zip(cols, conn.execute(f"SELECT {', '.join(cols)} FROM results WHERE id = 1").fetchone()))
    out = []
    for i in range(n):
        r = dict(base)
        r["sha256"] = f"{i:064x}"
        r["original_name"] = f"synthetic_{i:05d}.jpg"
        r["p_high_risk"] = None if i % 97 == 0 else round(rnd.random(), 4)
        r["needs_review"] = int(rnd.random() < 0.3)
        r["review_reasons"] = "high_risk" if r["needs_review"] else ""
        out.append(tuple(r[c] for c in cols))
    conn.executemany(f"INSERT INTO results ({', '.join(cols)}) VALUES ({', '.join('?' for _ in cols)})", out)
    conn.commit()
    conn.close()
