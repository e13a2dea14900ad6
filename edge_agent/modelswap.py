"""Which model bundle is active, and how a new one is checked before it may screen anything.

Why a pointer file: a clinic box gets new models for months without anybody editing the unit or the
config. `edge-agent model activate DIR` verifies the bundle here (checksums, signature and trust exactly as
load_bundle does, format, gate, every variant opened and a test inference run), then writes
`active-model.json` beside the database (the agent's state folder) atomically, keeping the previous entry
for `edge-agent model rollback`. The daemon reads the pointer at start and on SIGHUP (`systemctl reload`);
it verifies the bundle again itself (the copy it will run), and only a bundle that passed everything is
handed to the inference thread, which switches between two batches (infer_stage.py). A bundle that fails
leaves the running model in place and the reason in the log, the events table and `status`.

The pointer names a folder and the manifest hash it was verified with; the daemon refuses a bundle whose
manifest changed since it was activated (someone edited the folder afterwards) - activate it again.
"""
from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .atomicfile import write_atomic
from .bundle import Bundle, BundleError, load_bundle
from .config import ConfigError, Settings
from .paths import inside, real
from .store import now_iso

log = logging.getLogger(__name__)

POINTER_NAME = "active-model.json"
HISTORY = 20  # activations remembered in the pointer file (the events table keeps them all)


class SwapRejected(Exception):
    """The bundle may not replace the running one; the message says why and what to do."""


def pointer_path(db_path: Path) -> Path:
    """The pointer lives beside the database: the one folder the agent and its administrator share."""
    return real(db_path).parent / POINTER_NAME


def read_pointer(path: Path) -> dict[str, Any]:
    """The pointer's content ({} when there is none); SwapRejected when it is damaged."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise SwapRejected(f"cannot read the active-model pointer {path} ({e.strerror}); make it readable by the "
                           "agent's user or remove it to use the configured model") from None
    try:
        data = json.loads(raw[:1 << 20])
    except ValueError as e:
        raise SwapRejected(f"the active-model pointer {path} is not valid JSON ({e}); run `edge-agent model activate "
                           "DIR` again or remove the file to use the configured model") from None
    if not isinstance(data, dict) or not isinstance(data.get("active", {}), dict):
        raise SwapRejected(f"the active-model pointer {path} has an unexpected layout; run `edge-agent model "
                           "activate DIR` again or remove the file to use the configured model")
    return data


def write_pointer(path: Path, data: dict[str, Any]) -> None:
    """Atomic: a temporary file in the same folder, fsynced, renamed over the pointer, folder fsynced. A crash
    leaves the old pointer or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # paths and ids only; the agent's user must read it whoever activated
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode(), mode=0o644)


def entry(bundle: Bundle) -> dict[str, Any]:
    return {"path": str(real(bundle.path)), "model_id": bundle.model_id, "manifest_sha256": bundle.manifest_sha256,
            "activated_at": now_iso()}


def configured_model(s: Settings) -> tuple[Path, str | None, str]:
    """(bundle folder, manifest sha256 it must have or None, where that choice came from)."""
    p = pointer_path(s.db_path)
    data = read_pointer(p)
    act = data.get("active")
    if isinstance(act, dict) and isinstance(act.get("path"), str):
        sha = act.get("manifest_sha256") if isinstance(act.get("manifest_sha256"), str) else None
        return Path(act["path"]), sha, f"activated ({p})"
    return s.model_path, None, "the model setting"


@dataclass
class Candidate:
    """A bundle that passed every check, its engine loaded and warm: ready to be switched in."""

    bundle: Bundle
    engine: Any  # infer.Engine
    policy: Any  # triage.Policy
    variant: str
    needs_restart: str | None = None  # why it cannot be switched in place (labels/preprocessing differ)


def prepare(path: Path, s: Settings, current: Bundle | None = None, expect_sha: str | None = None,
            on_event: Any = None) -> Candidate:
    """Verify the bundle at `path` fully and load it; SwapRejected with the reason otherwise.

    Checks, in order: outside the inbox; checksums, signature/trust, format, labels, thresholds and gate
    (load_bundle); the manifest is the one activated (expect_sha); the policy with this device's
    threshold settings; every variant opened; a test inference on the primary with the expected output.
    """
    from .infer import Engine, _short
    from .signing import trust_from_settings
    from .triage import Policy

    where = real(path)
    if s.inbox is not None and inside(where, real(s.inbox)):
        raise SwapRejected(f"the bundle {where} is inside the inbox: the agent would screen and move it; copy it "
                           "to /opt/edge-agent/models/ (or any folder outside the inbox) and activate that copy")
    if not where.is_dir():
        raise SwapRejected(f"no bundle folder at {where}: pass the folder that holds manifest.json")
    try:
        bundle = load_bundle(where, trust_from_settings(s))
    except (BundleError, ConfigError) as e:
        raise SwapRejected(f"the bundle {where} failed verification: {e}") from None
    if expect_sha is not None and bundle.manifest_sha256 != expect_sha:
        raise SwapRejected(f"the manifest of {where} changed after it was activated (sha256 {bundle.manifest_sha256[:12]}"
                           f", activated {expect_sha[:12]}): someone modified the folder; check it and run "
                           "`edge-agent model activate` on it again")
    try:  # the site calibration for this bundle (site_calibration.py): refused if made for another model id
        from .site_calibration import resolve as resolve_calibration

        policy = Policy.from_bundle(bundle, s.thresholds, s.threshold_override, resolve_calibration(s.calibration, bundle))
    except ConfigError as e:
        raise SwapRejected(f"the bundle {where} does not fit this device's threshold settings: {e}") from None
    engine = Engine(bundle, s.providers, s.threads, on_event=on_event)
    try:
        variant = engine.load()
        for other in bundle.variants:  # every variant the agent might switch to must open here
            if other != variant and other in (bundle.primary, bundle.fallback):
                engine._open(other)
        x = np.zeros((1, 3, bundle.input_size, bundle.input_size), np.float32)
        logits, pooled, variant = engine.infer_features(x, pooled=bundle.ood is not None)
        if bundle.ood is not None:  # format 3: the out-of-distribution score must be computable too
            if pooled is None or not np.all(np.isfinite(bundle.ood.score(pooled, variant))):
                raise ValueError("the out-of-distribution statistics give no finite score for the test image")
    except Exception as e:
        raise SwapRejected(f"the bundle {where} does not load or run here: {_short(e)}; rebuild or re-copy it "
                           "(`edge-agent model verify` shows the details)") from None
    if logits.shape != (1, len(bundle.labels)) or not np.all(np.isfinite(logits)):
        raise SwapRejected(f"the bundle {where} produced an unusable test result (shape {logits.shape}); rebuild it")
    why = None
    if current is not None:
        if tuple(bundle.labels) != tuple(current.labels):
            why = "its labels differ from the running model's (the database needs new columns)"
        elif bundle.preprocessing != current.preprocessing:
            why = "its preprocessing differs from the running model's (images in flight were prepared for the old one)"
    return Candidate(bundle, engine, policy, variant, why)


def activate(s: Settings, path: Path) -> tuple[Candidate, dict[str, Any]]:
    """Verify `path` and make it the active model in the pointer (previous one kept for rollback). The
    running daemon picks it up on SIGHUP. Raises SwapRejected, leaving the pointer untouched."""
    cand = prepare(path, s)
    p = pointer_path(s.db_path)
    data = read_pointer(p)
    new = entry(cand.bundle)
    old = data.get("active") if isinstance(data.get("active"), dict) else None
    if old is None:  # the first activation: the configured model is what rollback returns to
        old = {"path": str(real(s.model_path)), "model_id": None, "manifest_sha256": None, "activated_at": None,
               "configured": True}
    history = [h for h in data.get("history", []) if isinstance(h, dict)][-(HISTORY - 1):]
    data = {"active": new, "previous": old, "history": [*history, {**new, "action": "activate"}]}
    write_pointer(p, data)
    return cand, data


def rollback(s: Settings) -> tuple[Candidate, dict[str, Any]]:
    """Make the previous model active again (verified like any activation); SwapRejected if there is none or
    it no longer passes."""
    p = pointer_path(s.db_path)
    data = read_pointer(p)
    prev = data.get("previous")
    if not isinstance(prev, dict) or not isinstance(prev.get("path"), str):
        raise SwapRejected(f"there is no previous model to return to ({p} records none): activate a bundle with "
                           "`edge-agent model activate DIR`")
    cand = prepare(Path(prev["path"]), s)
    new = entry(cand.bundle)
    history = [h for h in data.get("history", []) if isinstance(h, dict)][-(HISTORY - 1):]
    if prev.get("configured"):
        # back to the model setting: no pointer means the configured model (and a later config change applies)
        out = {"previous": data.get("active"), "history": [*history, {**new, "action": "rollback"}]}
    else:
        out = {"active": new, "previous": data.get("active"), "history": [*history, {**new, "action": "rollback"}]}
    write_pointer(p, out)
    return cand, out


# --- the daemon's side: start-up and SIGHUP ----------------------------------------------------

def initial_model(s: Settings, configured: Path) -> tuple[Path, str | None, str]:
    """The bundle the agent starts with: the activated one if the pointer names one, else the setting."""
    try:
        path, sha, source = configured_model(s)
    except SwapRejected as e:
        raise ConfigError(str(e)) from None
    if sha is None:
        return configured, None, source
    log.info("using the activated model %s (%s; `edge-agent model rollback` returns to the previous one)", path,
             source)
    return path, sha, source


def start_reload(agent: Any) -> None:
    """Verify in a spare thread, so the inbox keeps being screened (and the watchdog fed) meanwhile."""
    t = getattr(agent, "_reload_thread", None)
    if t is not None and t.is_alive():
        log.warning("SIGHUP received while the previous reload is still being verified; reloading again after it")
        agent._reload_again = True
        return
    agent._reload_again = False
    agent._reload_thread = threading.Thread(target=_reload_guarded, args=(agent,), name="edge-agent-reload",
                                            daemon=True)
    agent._reload_thread.start()


def _reload_guarded(agent: Any) -> None:
    try:
        _reload(agent)
    except Exception as e:  # a reload must never take the running agent down
        log.exception("reload failed unexpectedly; still screening with the running model")
        _note(agent, "failed", f"internal error while reloading: {type(e).__name__}: {e}")
    if getattr(agent, "_reload_again", False):
        agent._reload_again = False
        _reload_guarded(agent)


def _note(agent: Any, result: str, detail: str, kind: str | None = None) -> None:
    agent.swap_note = {"result": result, "detail": detail, "at": now_iso()}
    if kind is not None:
        agent._event(kind, detail)
    agent.state_due = True
    agent.wake.put(("wake", "", ""))


def _reload(agent: Any) -> None:
    from dataclasses import replace

    from .infer_stage import ActiveModel

    cur: Bundle = agent.bundle
    log.info("reload requested (SIGHUP): re-reading the settings and the active model")
    if agent.reload_settings is not None:
        try:
            new_s = agent.reload_settings()
        except ConfigError as e:
            msg = f"the settings could not be re-read, nothing changed: {e}"
            log.error("reload: %s", msg)
            _note(agent, "rejected", msg, "reload_failed")
            return
        if replace(new_s, model=agent.s.model) != agent.s:
            changed = [k for k in agent.s.__dataclass_fields__ if k != "model"
                       and getattr(new_s, k) != getattr(agent.s, k)]
            agent.restart_reason = (f"settings changed ({', '.join(changed)}): they apply at start, so the agent "
                                    "restarts (systemd starts it again)")
            _note(agent, "restart", agent.restart_reason, "reload_restart")
            return
        agent.s = new_s
    try:
        path, sha, source = configured_model(agent.s)
        cand = prepare(path, agent.s, current=cur, expect_sha=sha, on_event=agent._event)
    except SwapRejected as e:
        msg = f"model not switched: {e}; still screening with {cur.model_id}"
        log.error("%s", msg)
        _note(agent, "rejected", msg, "model_rejected")
        return
    b = cand.bundle
    if b.manifest_sha256 == cur.manifest_sha256 and real(b.path) == real(cur.path):
        log.info("reload: %s is already the running model; nothing to switch", b.model_id)
        _note(agent, "unchanged", f"{b.model_id} is already running")
        return
    if cand.needs_restart is not None:
        agent.restart_reason = (f"the new model {b.model_id} passed every check but cannot be switched in place: "
                                f"{cand.needs_restart}; the agent restarts with it")
        _note(agent, "restart", agent.restart_reason, "reload_restart")
        return
    agent.model_source = source
    agent.stage.offer(ActiveModel(b, cand.engine, cand.policy, cand.policy.to_json(), source))


def swapped(agent: Any, old: Any, new: Any) -> None:
    """Called by the inference thread right after the switch: record it (events table, status)."""
    b = new.bundle
    detail = (f"{old.bundle.model_id} -> {b.model_id} (variant {new.engine.variant}, manifest "
              f"{b.manifest_sha256[:12]}, from {b.path}; {new.source})")
    _note(agent, "switched", detail, "model_swap")


# --- the command line's side: tell the running daemon and wait for its answer ------------------------

def _agent_state(db: Path) -> dict[str, str]:
    from .store import connect

    conn = connect(db, readonly=True)
    try:
        return {r[0]: r[1] for r in conn.execute("SELECT key, value FROM agent_state")}
    finally:
        conn.close()


def running_daemon(db: Path) -> int | None:
    """The pid of the `run` daemon using this database, if one is running now."""
    from .status import collect
    from .store import StoreError, connect

    try:
        conn = connect(db, readonly=True)
    except StoreError:
        return None
    try:
        st = collect(conn, db)
    finally:
        conn.close()
    return int(st["agent"]["pid"]) if st["running"] else None


def tell_daemon(db: Path, manifest_sha256: str, wait: float) -> tuple[str, str]:
    """SIGHUP the running daemon and wait until it reports the outcome. Returns (result, message):
    result is 'not-running', 'switched', 'restart', 'rejected', 'no-permission' or 'timeout'."""
    import signal
    import time

    pid = running_daemon(db)
    if pid is None:
        return "not-running", "the agent is not running: it starts with this model"
    before = _agent_state(db).get("model_swap", "")
    try:
        os.kill(pid, signal.SIGHUP)
    except PermissionError:
        return "no-permission", (f"cannot signal the agent (pid {pid}) as this user: run `systemctl reload "
                                 "edge-agent` (or this command as root / the agent's user)")
    except ProcessLookupError:
        return "not-running", "the agent stopped meanwhile: it starts with this model"
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        time.sleep(0.2)
        st = _agent_state(db)
        if st.get("model_manifest_sha256") == manifest_sha256 and st.get("pid") == str(pid):
            return "switched", f"the running agent (pid {pid}) switched to it between two batches"
        note = st.get("model_swap", "")
        if note and note != before:
            try:
                n = json.loads(note)
            except ValueError:
                continue
            if n.get("result") in ("rejected", "restart", "failed"):
                return ("restart" if n["result"] == "restart" else "rejected"), str(n.get("detail", ""))
            if n.get("result") == "switched":
                return "switched", f"the running agent (pid {pid}) switched: {n.get('detail', '')}"
    return "timeout", (f"the agent (pid {pid}) did not report the switch within {wait:g} s; see `edge-agent "
                       "status` and the journal")
