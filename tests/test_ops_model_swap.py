"""Model swap under load (issue 14, item 1): `edge-agent model activate` / `rollback` / SIGHUP against a real
daemon screening a stream of real JPEGs, with real bundles from bundle_factory.

What must hold: every file gets exactly one outcome; results come from the model that was active when
their batch ran (A, then B, then A again after rollback), never from a rejected bundle; a bundle that
fails verification (CLI) or fails to load (daemon) leaves the running model in place and says why.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest
from bundle_factory import make_bundle
from conftest import EXAMPLES, rows, run_agent, variant_jpegs
from faults import AgentProc, site_args, wait_for


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("swap-bundles")
    a = make_bundle(root / "A", seed=1)
    b = make_bundle(root / "B", seed=2)
    c = make_bundle(root / "C", seed=3)  # damaged after signing: fails the checksums
    data = bytearray((c / "model.fp32.onnx").read_bytes())
    data[-5] ^= 0xFF
    (c / "model.fp32.onnx").write_bytes(bytes(data))
    # D verifies (signed, checksummed) but its only allowed model does not load in onnxruntime
    d = make_bundle(root / "D", seed=4, int8_bytes=b"this is not an ONNX model", fallback=None)
    return {"A": a, "B": b, "C": c, "D": d}


def model_id(bundle: Path) -> str:
    return json.loads((bundle / "manifest.json").read_text())["model_id"]


def manifest_sha(bundle: Path) -> str:
    import hashlib

    return hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()


class Feeder:
    """Drops distinct JPEGs into the inbox (temp name, then rename) until stopped."""

    def __init__(self, sources: list[Path], inbox: Path) -> None:
        self.sources, self.inbox = sources, inbox
        self.names: list[str] = []
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        i = 0
        while not self.stop.is_set() or i % 4:
            src = self.sources[i % len(self.sources)]
            name = f"s{i:04d}.jpg"
            tmp = self.inbox / f".{name}.part"
            shutil.copyfile(src, tmp)
            os.rename(tmp, self.inbox / name)
            self.names.append(name)
            i += 1
            time.sleep(0.05)


def outcome_count(db: Path) -> int:
    try:
        return sum(rows(db, f"SELECT count(*) FROM {t}")[0][0] for t in ("results", "duplicates", "quarantine"))
    except sqlite3.OperationalError:
        return 0


def cli(*args: str) -> tuple[int, str]:
    p = run_agent(*args)
    return p.returncode, p.stdout + p.stderr


def test_swap_under_load_good_broken_rollback_and_daemon_rejection(tmp_path: Path, dirs: dict[str, Path],
                                                                   bundles: dict[str, Path], procs: list) -> None:
    sources = variant_jpegs(sorted(EXAMPLES.glob("*.jpg")), tmp_path / "src", 400)
    db = dirs["db"]
    ids = {k: model_id(v) for k, v in bundles.items()}
    assert len(set(ids.values())) == 4
    agent = AgentProc("run", site_args(dirs, bundles["A"], "--quiet-seconds", "0", "--rescan-seconds", "1",
                                       "--log-level", "INFO"), tmp_path / "agent.log", registry=procs)
    feeder = Feeder(sources, dirs["inbox"])
    wait_for(lambda: "watching" in agent.log(), what="agent ready", proc=agent)
    feeder.t.start()
    try:
        wait_for(lambda: outcome_count(db) >= 8, what="first results under A", proc=agent)
        code, out = cli("model", "activate", str(bundles["B"]), "--db", str(db))
        assert code == 0, out
        assert "switched" in out and ids["B"] in out

        count = outcome_count(db)
        wait_for(lambda: outcome_count(db) >= count + 8, what="results under B", proc=agent)
        code, out = cli("model", "activate", str(bundles["C"]), "--db", str(db))
        assert code == 1, out
        assert "checksum" in out.lower() or "sha256" in out.lower(), out
        assert "active model is unchanged" in out

        count = outcome_count(db)
        wait_for(lambda: outcome_count(db) >= count + 8, what="more results under B", proc=agent)
        code, out = cli("model", "rollback", "--db", str(db))
        assert code == 0, out
        assert ids["A"] in out

        # the daemon's own check: a pointer naming a bundle that verifies but cannot load, then SIGHUP
        count = outcome_count(db)
        wait_for(lambda: outcome_count(db) >= count + 8, what="results under A again", proc=agent)
        ptr = db.parent / "active-model.json"
        saved = ptr.read_text() if ptr.exists() else None
        ptr.write_text(json.dumps({"active": {"path": str(bundles["D"]), "model_id": ids["D"],
                                              "manifest_sha256": manifest_sha(bundles["D"])}}))
        os.kill(agent.pid, signal.SIGHUP)
        wait_for(lambda: rows(db, "SELECT count(*) FROM events WHERE kind = 'model_rejected'")[0][0] == 1,
                 what="daemon rejects D", proc=agent)
        st = json.loads(cli("status", "--db", str(db), "--format", "json")[1].split("\nWARNING")[0])
        note = json.loads(st["agent"]["model_swap"])
        assert note["result"] == "rejected" and ids["A"] in note["detail"] and "does not load" in note["detail"]
        assert st["agent"]["model_id"] == ids["A"]
        if saved is None:
            ptr.unlink()
        else:
            ptr.write_text(saved)
        count = outcome_count(db)
        wait_for(lambda: outcome_count(db) >= count + 8, what="still screening after the rejection", proc=agent)
    finally:
        feeder.stop.set()
        feeder.t.join()
    wait_for(lambda: outcome_count(db) == len(feeder.names), timeout=120, what="every file an outcome", proc=agent)
    agent.term()
    assert agent.wait(60) == 0, agent.log()[-3000:]

    # every file exactly one outcome, all of them screened (distinct images: no duplicates, no quarantine)
    got = [r[0] for r in rows(db, "SELECT original_name FROM results UNION ALL SELECT original_name FROM duplicates "
                                  "UNION ALL SELECT original_name FROM quarantine")]
    assert sorted(got) == sorted(feeder.names)
    assert rows(db, "SELECT count(*) FROM quarantine")[0][0] == 0
    # the model ids, in commit order: A..., B..., A... - each batch by one whole model, never C or D
    seq = [r[0] for r in rows(db, "SELECT model_id FROM results ORDER BY id")]
    runs = [seq[0]] + [m for prev, m in zip(seq, seq[1:]) if m != prev]
    assert runs == [ids["A"], ids["B"], ids["A"]], runs
    # the results carry the manifest of the model that produced them
    for mid, sha in rows(db, "SELECT DISTINCT model_id, manifest_sha256 FROM results"):
        key = next(k for k, v in ids.items() if v == mid)
        assert sha == manifest_sha(bundles[key])
    kinds = [r[0] for r in rows(db, "SELECT kind FROM events WHERE kind LIKE 'model_%' ORDER BY id")]
    assert kinds == ["model_swap", "model_swap", "model_rejected"], kinds
    assert not list(dirs["inbox"].iterdir())


def test_activate_when_not_running_applies_at_start_and_rollback_returns(tmp_path: Path, dirs: dict[str, Path],
                                                                         bundles: dict[str, Path]) -> None:
    variant_jpegs(sorted(EXAMPLES.glob("*.jpg")), dirs["inbox"], 3, prefix="one")
    args = site_args(dirs, bundles["A"], "--quiet-seconds", "0")
    code, out = cli("scan", *args)
    assert code == 0, out
    code, out = cli("model", "activate", str(bundles["B"]), "--db", str(dirs["db"]))
    assert code == 0, out
    assert "not running" in out
    variant_jpegs(sorted(EXAMPLES.glob("*.jpg"))[3:], dirs["inbox"], 3, prefix="two")
    assert cli("scan", *args)[0] == 0
    code, out = cli("model", "rollback", "--db", str(dirs["db"]))
    assert code == 0, out
    variant_jpegs(sorted(EXAMPLES.glob("*.jpg"))[6:], dirs["inbox"], 3, prefix="three")
    assert cli("scan", *args)[0] == 0
    got = {(r[0][:3], r[1]) for r in rows(dirs["db"], "SELECT original_name, model_id FROM results")}
    assert got == {("one", model_id(bundles["A"])), ("two", model_id(bundles["B"])), ("thr", model_id(bundles["A"]))}
    # rollback toggles (like `cd -`): the one rolled back from is the previous one now
    code, out = cli("model", "rollback", "--db", str(dirs["db"]), "--no-reload")
    assert code == 0 and model_id(bundles["B"]) in out, out


def test_rollback_without_an_activation_says_so(dirs: dict[str, Path]) -> None:
    dirs["db"].parent.mkdir(parents=True)
    code, out = cli("model", "rollback", "--db", str(dirs["db"]))
    assert code == 1 and "no previous model" in out, out


@pytest.mark.parametrize("case", ["damaged", "unloadable", "inside-inbox", "missing", "pointer-garbage"])
def test_activate_rejects_bad_bundles_and_keeps_the_pointer(tmp_path: Path, dirs: dict[str, Path],
                                                           bundles: dict[str, Path], case: str) -> None:
    dirs["db"].parent.mkdir(parents=True)
    ptr = dirs["db"].parent / "active-model.json"
    assert cli("model", "activate", str(bundles["B"]), "--db", str(dirs["db"]), "--no-reload")[0] == 0
    before = ptr.read_bytes()
    target = {"damaged": bundles["C"], "unloadable": bundles["D"], "inside-inbox": dirs["inbox"] / "bundle",
              "missing": tmp_path / "nope"}.get(case, bundles["A"])
    if case == "inside-inbox":
        shutil.copytree(bundles["A"], target)
    if case == "pointer-garbage":
        ptr.write_text("{not json")
        before = ptr.read_bytes()
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'inbox = "{dirs["inbox"]}"\ndb = "{dirs["db"]}"\n')
    code, out = cli("model", "activate", str(target), "--config", str(cfg))
    assert code == 1, out
    assert "active model is unchanged" in out
    want = {"damaged": "sha256", "unloadable": "does not load", "inside-inbox": "inside the inbox",
            "missing": "no bundle folder", "pointer-garbage": "not valid JSON"}[case]
    assert want in out, out
    assert ptr.read_bytes() == before


def test_start_refuses_an_activated_bundle_changed_after_activation(tmp_path: Path, dirs: dict[str, Path],
                                                                    bundles: dict[str, Path]) -> None:
    """The pointer records the manifest it verified: a folder edited afterwards (even re-signed) is refused at
    start with what to do, and nothing is screened with it."""
    from bundle_factory import write_manifest

    b2 = tmp_path / "B2"
    shutil.copytree(bundles["B"], b2)
    dirs["db"].parent.mkdir(parents=True)
    assert cli("model", "activate", str(b2), "--db", str(dirs["db"]))[0] == 0
    m = json.loads((b2 / "manifest.json").read_text())
    m["thresholds"]["melanoma"]["probability"] = 0.9
    write_manifest(b2, m)  # valid and signed, but not what was activated
    variant_jpegs(sorted(EXAMPLES.glob("*.jpg")), dirs["inbox"], 1)
    code, out = cli("scan", *site_args(dirs, bundles["A"], "--quiet-seconds", "0"))
    assert code == 2, out
    assert "changed after it was activated" in out and "model rollback" in out
    assert len(list(dirs["inbox"].iterdir())) == 1


def test_bundle_with_other_preprocessing_restarts_the_daemon_with_it(tmp_path: Path, dirs: dict[str, Path],
                                                                     bundles: dict[str, Path], procs: list) -> None:
    """Images in flight were prepared for the running model's input size: a bundle with other preprocessing
    cannot be switched between batches. It is verified, then the daemon finishes what it holds and exits 4
    (the unit restarts it), and the next start runs it."""
    big = make_bundle(tmp_path / "big", seed=5, size=48)
    variant_jpegs(sorted(EXAMPLES.glob("*.jpg")), dirs["inbox"], 3, prefix="before")
    args = site_args(dirs, bundles["A"], "--quiet-seconds", "0")
    a = AgentProc("run", args, tmp_path / "a.log", registry=procs)
    wait_for(lambda: outcome_count(dirs["db"]) == 3, what="first files", proc=a)
    code, out = cli("model", "activate", str(big), "--db", str(dirs["db"]))
    assert code == 0, out
    assert "preprocessing differs" in out and "restarts" in out
    assert a.wait(60) == 4, a.log()[-2000:]
    variant_jpegs(sorted(EXAMPLES.glob("*.jpg"))[3:], dirs["inbox"], 3, prefix="after")
    b = AgentProc("run", args, tmp_path / "b.log", registry=procs)
    wait_for(lambda: outcome_count(dirs["db"]) == 6, what="files after the restart", proc=b)
    b.term()
    assert b.wait(60) == 0
    got = {(r[0][:5], r[1]) for r in rows(dirs["db"], "SELECT original_name, model_id FROM results")}
    assert got == {("befor", model_id(bundles["A"])), ("after", model_id(big))}
    assert rows(dirs["db"], "SELECT count(*) FROM events WHERE kind = 'reload_restart'")[0][0] == 1


def test_reload_after_changing_the_model_setting_switches_in_place(tmp_path: Path, dirs: dict[str, Path],
                                                                   bundles: dict[str, Path], procs: list) -> None:
    """`systemctl reload` after editing `model` in config.toml: verified, switched between batches, no restart."""
    cfg = tmp_path / "config.toml"
    body = f'inbox = "{dirs["inbox"]}"\ndb = "{dirs["db"]}"\nworkers = 2\nthreads = 1\nquiet_seconds = 0\n'
    cfg.write_text(body + f'model = "{bundles["A"]}"\n')
    a = AgentProc("run", ["--config", str(cfg)], tmp_path / "a.log", registry=procs)
    variant_jpegs(sorted(EXAMPLES.glob("*.jpg")), dirs["inbox"], 2, prefix="first")
    wait_for(lambda: outcome_count(dirs["db"]) == 2, what="first files", proc=a)
    cfg.write_text(body + f'model = "{bundles["B"]}"\n')
    os.kill(a.pid, signal.SIGHUP)
    wait_for(lambda: rows(dirs["db"], "SELECT count(*) FROM events WHERE kind = 'model_swap'")[0][0] == 1,
             what="switched", proc=a)
    variant_jpegs(sorted(EXAMPLES.glob("*.jpg"))[2:], dirs["inbox"], 2, prefix="second")
    wait_for(lambda: outcome_count(dirs["db"]) == 4, what="second files", proc=a)
    assert a.alive()
    a.term()
    assert a.wait(60) == 0
    got = {(r[0][:5], r[1]) for r in rows(dirs["db"], "SELECT original_name, model_id FROM results")}
    assert got == {("first", model_id(bundles["A"])), ("secon", model_id(bundles["B"]))}
