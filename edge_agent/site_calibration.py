"""Site calibration: re-fit the temperature and the review thresholds on a site's own labelled cases.

Why: a model tuned to catch 95% of melanomas on its training clinics caught 73-89% at other clinics (a
new dermatoscope, lamp and population shift the probabilities). `edge-agent calibrate` takes the site's
labelled cases (a CSV of file,label screened with the agent's own decode/preprocess/infer code, or the
verdicts recorded in the database's `reviews` table), fits a temperature and, per high-risk rule, the
largest threshold that reaches the rule's target sensitivity on those cases, each with a bootstrap 95%
interval. The result is a *site calibration file* written beside the bundle (never into it: the bundle
stays byte-identical to what was signed), bound to the bundle's model id and sealed with the SHA-256 of
its canonical content, so a file for another model or an edited one is refused at start.

Thresholds may only become stricter (flag at least as many of the site's cases as the bundle's policy
does) unless the caller passes allow_looser; a loosened file is announced at every agent start.
"""
from __future__ import annotations

import csv
import getpass
import hashlib
import json
import math
import os
import socket
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import atomicfile
from .bundle import Bundle
from .calibration_math import (bootstrap_ci, fit_temperature, floor6, logits_from_probabilities, min_positives,
                               risk_score, sens_spec, softmax, threshold_for_flag_count, threshold_for_sensitivity)
from .config import ConfigError

FORMAT = "edge-agent-site-calibration"
FORMAT_VERSION = 1
SUFFIX = ".site-calibration.json"
MAX_BYTES = 1 << 20  # a calibration file is a few KiB; anything larger is not one
TEMPERATURE_RANGE = (0.05, 20.0)
DEFAULT_TARGET = 0.95
DEFAULT_REPS = 1000
TEMPERATURE_REPS = 200  # each temperature resample is a full fit: fewer, still a stable percentile interval
BATCH = 16

# Names a site's spreadsheet may use for a bundle label, besides the code and the bundle's label name.
ALIASES = {"melanoma": "mel", "nevus": "nv", "naevus": "nv", "nevi": "nv", "seborrheic_keratosis": "bkl",
           "seborrheic keratosis": "bkl", "seborrhoeic keratosis": "bkl", "basal cell carcinoma": "bcc",
           "actinic keratosis": "akiec", "dermatofibroma": "df", "vascular lesion": "vasc"}


class CalibrationError(ConfigError):
    """A calibration file or calibration input is unusable; the message says what and what to do."""


class TooFewPositives(CalibrationError):
    """Not enough positive cases for a rule to say anything about its sensitivity (nothing was written)."""


def default_path(bundle_path: Path) -> Path:
    """The site calibration file of a bundle: beside the bundle folder (never inside: the bundle's checksums
    list every file in it), named after it: /opt/edge-agent/bundle -> /opt/edge-agent/bundle.site-calibration.json."""
    p = Path(os.path.abspath(bundle_path))
    return p.parent / f"{p.name}{SUFFIX}"


# --- the file ----------------------------------------------------------------------------

def canonical(doc: dict[str, Any]) -> bytes:
    """The bytes the checksum covers: the document without `sha256`, sorted keys, no spaces, ASCII."""
    body = {k: v for k, v in doc.items() if k != "sha256"}
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def seal(doc: dict[str, Any]) -> dict[str, Any]:
    """The document with its calibration id (derived from the content) and the SHA-256 of its canonical content."""
    doc = {k: v for k, v in doc.items() if k not in ("sha256", "calibration_id")}
    stamp = str(doc.get("created_at", "")).replace("-", "").replace(":", "").split(".")[0]
    doc["calibration_id"] = f"cal-{stamp}-{hashlib.sha256(canonical(doc)).hexdigest()[:8]}"
    doc["sha256"] = hashlib.sha256(canonical(doc)).hexdigest()
    return doc


def write_atomic(path: Path, doc: dict[str, Any]) -> None:
    """Write the file whole or not at all (edge_agent/atomicfile.py)."""
    data = (json.dumps(doc, indent=2, sort_keys=True, allow_nan=False) + "\n").encode()
    try:
        atomicfile.write_atomic(path, data)
    except OSError as e:
        raise CalibrationError(f"cannot write the calibration file {path} ({e.strerror or e}); make its folder "
                               "writable or pass --out to write it elsewhere (then set `calibration` to that path)") from None


@dataclass(frozen=True)
class SiteCalibration:
    """A verified site calibration file, as the agent applies it."""

    path: Path
    calibration_id: str
    model_id: str
    temperature: float
    thresholds: dict[str, float]           # rule name -> probability
    loosened: tuple[str, ...]              # rules made less strict than the bundle's (allow_looser)
    doc: dict[str, Any] = field(repr=False)

    def summary(self) -> str:
        th = ", ".join(f"{k} {v:g}" for k, v in self.thresholds.items())
        data = self.doc.get("data", {})
        return (f"{self.calibration_id} ({self.path}): temperature {self.temperature:.4g}, thresholds {th}; "
                f"{data.get('cases', '?')} cases from {data.get('source', '?')}, made {self.doc.get('created_at')} "
                f"by {self.doc.get('created_by')}")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def load_calibration(path: Path, bundle: Bundle) -> SiteCalibration:
    """Read and verify a site calibration file for `bundle`, or raise CalibrationError saying what to do."""
    where = f"the site calibration file {path}"
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise CalibrationError(f"{where} does not exist; run `edge-agent calibrate` or fix the `calibration` "
                               "setting") from None
    except OSError as e:
        raise CalibrationError(f"{where} cannot be read ({e.strerror or e}); make it readable by the agent's user") from None
    if len(data) > MAX_BYTES:
        raise CalibrationError(f"{where} is larger than {MAX_BYTES // 1024} KiB, so it is not a calibration file; "
                               "remove it or point `calibration` at the right file")
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise CalibrationError(f"{where} is not valid JSON ({e}): it is damaged; run `edge-agent calibrate` again "
                               "or restore it from a backup") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CalibrationError(f"{where} is not an edge-agent site calibration file (no \"format\": \"{FORMAT}\"); "
                               "remove it or point `calibration` at the right file")
    version = doc.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CalibrationError(f"{where} has no valid format_version; run `edge-agent calibrate` again")
    if version > FORMAT_VERSION:
        raise CalibrationError(f"{where} has format version {version}, newer than this agent understands "
                               f"({FORMAT_VERSION}); upgrade edge-agent or calibrate again with this version")
    try:
        want = hashlib.sha256(canonical(doc)).hexdigest()
    except ValueError:
        want = ""
    if doc.get("sha256") != want:
        raise CalibrationError(f"{where} fails its checksum (sha256 {str(doc.get('sha256'))[:16]}... recorded, "
                               f"{want[:16]}... computed): it was edited or damaged after `edge-agent calibrate` "
                               "wrote it, so its thresholds cannot be trusted; run `edge-agent calibrate` again "
                               "(thresholds must never be hand-edited) or restore the file")
    if doc.get("model_id") != bundle.model_id:
        raise CalibrationError(f"{where} was made for model {doc.get('model_id')!r}, but the bundle in use is "
                               f"{bundle.model_id!r}: a calibration only holds for the model it was fitted on; "
                               "run `edge-agent calibrate` for this bundle, or remove the file (or set `calibration` "
                               "to another file) to use the bundle's own thresholds")
    t = doc.get("temperature", {}).get("value") if isinstance(doc.get("temperature"), dict) else None
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not TEMPERATURE_RANGE[0] <= t <= TEMPERATURE_RANGE[1]:
        raise CalibrationError(f"{where} has an invalid temperature {t!r} (expected {TEMPERATURE_RANGE[0]}.."
                               f"{TEMPERATURE_RANGE[1]}); run `edge-agent calibrate` again")
    rules = {n for n, s in bundle.thresholds.items() if isinstance(s, dict) and "labels" in s}
    ths = doc.get("thresholds")
    if not isinstance(ths, dict) or set(ths) != rules:
        got = sorted(ths) if isinstance(ths, dict) else ths
        raise CalibrationError(f"{where} has thresholds for {got}, but the bundle's rules are {sorted(rules)}; run "
                               "`edge-agent calibrate` again")
    out: dict[str, float] = {}
    for name, spec in ths.items():
        p = spec.get("probability") if isinstance(spec, dict) else None
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= p <= 1.0:
            raise CalibrationError(f"{where}: threshold {name} = {p!r} is not a probability; run `edge-agent "
                                   "calibrate` again")
        out[name] = float(p)
    loosened = doc.get("loosened") or []
    return SiteCalibration(Path(path), str(doc.get("calibration_id")), bundle.model_id, float(t), out,
                           tuple(str(x) for x in loosened), doc)


def resolve(setting: Path | None, bundle: Bundle) -> SiteCalibration | None:
    """The calibration the agent applies: the `calibration` setting's file (must exist), else the file beside
    the bundle when there is one, else None (the bundle's own temperature and thresholds)."""
    if setting is not None:
        return load_calibration(setting, bundle)
    path = default_path(bundle.path)
    return load_calibration(path, bundle) if path.exists() else None


# --- the cases -----------------------------------------------------------------------------

@dataclass
class Cases:
    """Labelled cases as logits (up to a per-row constant) and true label indices."""

    logits: np.ndarray
    y: np.ndarray
    source: str
    excluded: list[tuple[str, str]] = field(default_factory=list)  # (file or case, why), reported, not used
    notes: list[str] = field(default_factory=list)


def label_lookup(bundle: Bundle) -> dict[str, str]:
    """Accepted spellings (lower case) -> label code: codes, the bundle's label names, common aliases."""
    out = {lab.lower(): lab for lab in bundle.labels}
    out.update({name.lower(): lab for lab, name in bundle.label_names.items() if lab in bundle.labels})
    out.update({k: v for k, v in ALIASES.items() if v in bundle.labels})
    return out


def read_csv(csv_path: Path, bundle: Bundle) -> tuple[list[tuple[Path, str]], list[str]]:
    """(file, label code) per case from a file,label CSV, and notes; CalibrationError for unusable input.

    Refused (nothing is fitted): labels the bundle does not know, files that do not exist, the same file
    listed with two different labels. Identical repeated rows are counted once (a note says so): a
    repeated case would weigh twice."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise CalibrationError(f"the CSV {csv_path} does not exist; pass a file,label CSV") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise CalibrationError(f"the CSV {csv_path} cannot be read ({e}); save it as UTF-8 CSV with the columns "
                               "file,label") from None
    lookup = label_lookup(bundle)
    base = csv_path.parent
    cases: dict[Path, tuple[str, int]] = {}
    unknown: list[str] = []
    missing: list[str] = []
    conflicts: list[str] = []
    bad: list[str] = []
    repeated = 0
    for n, row in enumerate(rows, 1):
        cells = [c.strip() for c in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if n == 1 and [c.lower() for c in cells[:2]] in (["file", "label"], ["image", "label"], ["path", "label"]):
            continue
        if len(cells) < 2 or not cells[0] or not cells[1]:
            bad.append(f"line {n}: {','.join(row)!r}")
            continue
        name, raw = cells[0], cells[1]
        code = lookup.get(raw.lower())
        if code is None:
            unknown.append(f"line {n}: {raw!r}")
            continue
        p = Path(os.path.expanduser(name))
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            missing.append(f"line {n}: {name}")
            continue
        key = Path(os.path.realpath(p))
        if key in cases:
            if cases[key][0] != code:
                conflicts.append(f"line {n}: {name} is {code}, line {cases[key][1]} said {cases[key][0]}")
            else:
                repeated += 1
            continue
        cases[key] = (code, n)

    def some(items: list[str]) -> str:
        return "; ".join(items[:10]) + (f"; ... and {len(items) - 10} more" if len(items) > 10 else "")

    if bad:
        raise CalibrationError(f"{csv_path}: {len(bad)} line(s) are not file,label ({some(bad)}); each line must be "
                               "FILE,LABEL")
    if unknown:
        known = ", ".join(f"{lab} ({bundle.label_names.get(lab, lab)})" for lab in bundle.labels)
        raise CalibrationError(f"{csv_path}: {len(unknown)} label(s) this model does not know ({some(unknown)}); use "
                               f"one of {known} (code or name, any case); nothing was calibrated")
    if missing:
        raise CalibrationError(f"{csv_path}: {len(missing)} file(s) do not exist ({some(missing)}); paths are "
                               f"relative to the CSV's folder {base}; fix or remove those lines")
    if conflicts:
        raise CalibrationError(f"{csv_path}: {len(conflicts)} file(s) are listed with two different labels "
                               f"({some(conflicts)}); keep the one verdict that is right")
    if not cases:
        raise CalibrationError(f"{csv_path} lists no cases; it needs lines FILE,LABEL")
    notes = [f"{repeated} repeated line(s) in the CSV counted once"] if repeated else []
    return [(p, code) for p, (code, _) in cases.items()], notes


def screen(files: list[tuple[Path, str]], bundle: Bundle, *, max_pixels: int, max_file_mb: float, limits: Any,
           providers: tuple[str, ...] = ("CPUExecutionProvider",), threads: int = 1, source: str = "csv") -> Cases:
    """Run the cases through the agent's own decode, preprocessing and model (the primary variant, as `run`).

    A file the agent would quarantine (not an image, truncated, too large, ...) is reported in
    Cases.excluded with the agent's reason and left out; the same image under two names counts once."""
    from .decode import decode_image
    from .infer import Engine
    from .rejection import Rejected

    engine = Engine(bundle, providers, threads)
    engine.load()
    lab_index = {lab: i for i, lab in enumerate(bundle.labels)}
    excluded: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    notes: list[str] = []
    logits: list[np.ndarray] = []
    ys: list[int] = []
    batch: list[np.ndarray] = []
    batch_y: list[int] = []

    ood_flagged = 0

    def flush() -> None:
        nonlocal ood_flagged
        if batch:
            out, pooled, variant = engine.infer_features(np.stack(batch).astype(np.float32, copy=False),
                                                         pooled=bundle.ood is not None)
            if bundle.ood is not None and pooled is not None:
                ood_flagged += int(np.sum(bundle.ood.flags(bundle.ood.score(pooled, variant), variant)))
            logits.extend(np.asarray(out, np.float64))
            ys.extend(batch_y)
            batch.clear()
            batch_y.clear()

    same = poor = 0
    for path, code in files:
        try:
            size = path.stat().st_size
            if size > max_file_mb * 2**20:
                raise Rejected("too_large_file", f"file is {size / 2**20:.1f} MiB, above max_file_mb {max_file_mb:g}")
            data = path.read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            if digest in seen:
                if seen[digest] != code:
                    raise CalibrationError(f"{path} is the same image as another case labelled {seen[digest]}, but "
                                           f"is labelled {code}; keep the one verdict that is right")
                same += 1
                continue
            seen[digest] = code
            d = decode_image(data, bundle.preprocessing, max_pixels, limits)
        except Rejected as e:
            excluded.append((str(path), f"{e.code}: {e.reason}"))
            continue
        except OSError as e:
            excluded.append((str(path), f"unreadable: {e.strerror or e}"))
            continue
        poor += bool(d.quality.poor)
        batch.append(d.tensor)
        batch_y.append(lab_index[code])
        if len(batch) >= BATCH:
            flush()
    flush()
    if same:
        notes.append(f"{same} file(s) were the same image as another case (same bytes) and counted once")
    if ood_flagged:
        notes.append(f"{ood_flagged} image(s) look unlike the training data (flagged out_of_distribution): kept, as "
                     "the agent screens them too; check they are dermoscopy images of this site")
    if poor:
        notes.append(f"{poor} image(s) failed the quality check (blurred, too dark or overexposed): kept, since the "
                     "agent screens such images too (flagged poor_quality)")
    k = len(bundle.labels)
    return Cases(np.asarray(logits, np.float64).reshape(-1, k), np.asarray(ys, int), source, excluded, notes)


def reviews_available(conn: sqlite3.Connection) -> bool:
    """A reviews table with verdict columns and at least one verdict (the review app's migration creates the
    table empty)."""
    cols = {r[1] for r in conn.execute("PRAGMA table_info(reviews)")}
    if not ({"result_id"} <= cols and bool({"diagnosis", "histopathology"} & cols)):
        return False
    return conn.execute("SELECT 1 FROM reviews LIMIT 1").fetchone() is not None


_VERDICTS = {
    "both": "SELECT r.id, r.model_id, r.probabilities, r.policy, NULLIF(TRIM(v.histopathology), ''), "
            "NULLIF(TRIM(v.diagnosis), '') FROM reviews v JOIN results r ON r.id = v.result_id",
    "histopathology": "SELECT r.id, r.model_id, r.probabilities, r.policy, NULLIF(TRIM(v.histopathology), ''), "
                      "NULL FROM reviews v JOIN results r ON r.id = v.result_id",
    "diagnosis": "SELECT r.id, r.model_id, r.probabilities, r.policy, NULL, NULLIF(TRIM(v.diagnosis), '') "
                 "FROM reviews v JOIN results r ON r.id = v.result_id",
}
_LATEST = " WHERE v.rowid = (SELECT max(w.rowid) FROM reviews w WHERE w.result_id = v.result_id)"


def cases_from_reviews(conn: sqlite3.Connection, bundle: Bundle) -> Cases:
    """Cases from the clinicians' verdicts in `reviews` (histopathology over diagnosis, the latest review of a
    result), with the logits recovered from the stored probabilities at the temperature they were made with.
    Only results of this bundle's model id count; verdicts that name no label of the model are reported."""
    if not reviews_available(conn):
        raise CalibrationError("the database has no `reviews` table with verdicts (result_id, diagnosis or "
                               "histopathology) yet: record reviews first, or pass --csv FILE with file,label lines")
    cols = {r[1] for r in conn.execute("PRAGMA table_info(reviews)")}
    # Constant statements only (no SQL built from strings): histopathology wins over the clinical diagnosis.
    which = ("both" if {"histopathology", "diagnosis"} <= cols else "histopathology" if "histopathology" in cols
             else "diagnosis")
    try:  # the latest review of each result (rowid order); a reviews view without rowid: every review
        rows = conn.execute(_VERDICTS[which] + _LATEST).fetchall()
    except sqlite3.OperationalError:
        rows = conn.execute(_VERDICTS[which]).fetchall()
    lookup = label_lookup(bundle)
    lab_index = {lab: i for i, lab in enumerate(bundle.labels)}
    logits, ys = [], []
    other_model = no_verdict = 0
    unknown: Counter[str] = Counter()
    for rid, model_id, probs, policy, histo, diag in rows:
        if model_id != bundle.model_id:
            other_model += 1
            continue
        if not histo and not diag:
            no_verdict += 1
            continue
        # Histopathology wins when it names a label of the model; the review app stores it as free text
        # ("compound nevus, no atypia"), so a report that names none falls back to the clinical diagnosis.
        code = lookup.get(str(histo).strip().lower()) if histo else None
        if code is None and diag:
            code = lookup.get(str(diag).strip().lower())
        if code is None:
            unknown[str(histo or diag)] += 1
            continue
        try:
            p = json.loads(probs)
            t = float((json.loads(policy) if policy else {}).get("temperature") or bundle.temperature)
        except (ValueError, TypeError, AttributeError):
            continue
        row = np.array([float(p.get(lab, 0.0)) for lab in bundle.labels])
        logits.append(logits_from_probabilities(row[None, :], t)[0])
        ys.append(lab_index[code])
    excluded = [(f"{n} review(s)", f"verdict {v!r} names no label of this model") for v, n in unknown.most_common()]
    notes = []
    if other_model:
        notes.append(f"{other_model} reviewed result(s) of another model id left out")
    if no_verdict:
        notes.append(f"{no_verdict} review(s) without a diagnosis or histopathology verdict left out")
    k = len(bundle.labels)
    return Cases(np.asarray(logits, np.float64).reshape(-1, k), np.asarray(ys, int), "reviews", excluded, notes)


# --- the fit -----------------------------------------------------------------------------------

def _ci(lo_hi: tuple[float | None, float | None]) -> list[float | None]:
    return [None if v is None else round(v, 6) for v in lo_hi]


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def rules_of(bundle: Bundle) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in bundle.thresholds.items() if isinstance(s, dict) and "labels" in s}


def check_positives(cases: Cases, bundle: Bundle, target: float | None = None) -> dict[str, int]:
    """Positives per rule; TooFewPositives naming how many more each short rule needs."""
    counts: dict[str, int] = {}
    short = []
    for name, spec in rules_of(bundle).items():
        tgt = float(target if target is not None else spec.get("target_sensitivity", DEFAULT_TARGET))
        idx = [bundle.labels.index(g) for g in spec["labels"]]
        n = int(np.isin(cases.y, idx).sum())
        counts[name] = n
        need = min_positives(tgt)
        if n < need:
            short.append(f"rule {name} ({'+'.join(spec['labels'])}): {n} positive case(s), at least {need} needed "
                         f"for a {tgt:.0%} sensitivity target - label {need - n} more")
    if short:
        raise TooFewPositives("too few positive cases to calibrate, nothing was written: " + "; ".join(short) +
                              ". With fewer than 1/(1 - target) positives one missed case moves the sensitivity "
                              "by more than the target allows, so the threshold would say nothing.")
    return counts


def fit(cases: Cases, bundle: Bundle, *, target: float | None = None, allow_looser: bool = False,
        reps: int = DEFAULT_REPS, seed: int = 0) -> dict[str, Any]:
    """Temperature and per-rule thresholds for the site, with bootstrap 95% intervals (the document's body)."""
    if len(cases.y) == 0:
        raise CalibrationError("no usable cases (every file was excluded); see the list above")
    check_positives(cases, bundle, target)  # refuses too few positives, in words
    z, y, labels = cases.logits, cases.y, list(bundle.labels)
    n = len(y)
    t_site = fit_temperature(z, y)
    t_ci = bootstrap_ci(lambda i: fit_temperature(z[i], y[i]), n, min(reps, TEMPERATURE_REPS), seed)
    p_site, p_bundle = softmax(z, t_site), softmax(z, bundle.temperature)
    out: dict[str, Any] = {"temperature": {"value": round(t_site, 6), "ci95": _ci(t_ci), "bundle": bundle.temperature},
                           "thresholds": {}, "loosened": []}
    for name, spec in rules_of(bundle).items():
        tgt = float(target if target is not None else spec.get("target_sensitivity", DEFAULT_TARGET))
        pos = np.isin(y, [labels.index(g) for g in spec["labels"]])
        score, score_b = risk_score(p_site, labels, spec["labels"]), risk_score(p_bundle, labels, spec["labels"])
        p_b = float(spec["probability"])
        flagged_b = score_b >= p_b

        def choose(i: np.ndarray) -> tuple[float, bool, float]:
            """(threshold, looser, fitted) on cases i: the target's threshold, held to the bundle's flag count
            unless allow_looser. The same procedure gives the point estimate and every bootstrap resample."""
            fitted = floor6(threshold_for_sensitivity(score[i], pos[i], tgt))
            need = int(flagged_b[i].sum())
            if int((score[i] >= fitted).sum()) >= need:
                return fitted, False, fitted
            if allow_looser:
                return fitted, True, fitted
            return floor6(threshold_for_flag_count(score[i], need)), False, fitted

        t, looser, fitted = choose(np.arange(n))
        note = None
        if not allow_looser and t != fitted:
            note = (f"the site's cases would allow {fitted:g} (flagging fewer of them than the bundle's policy); kept "
                    f"{t:g}, which flags as many as the bundle did - pass --allow-looser (clinician approval) "
                    "to use the looser value")
        if looser:
            out["loosened"].append(name)
        strata = pos.astype(int)
        t_ci_rule = bootstrap_ci(lambda i: choose(i)[0], n, reps, seed + 1, strata)

        def figures(flag: np.ndarray, sd: int) -> dict[str, Any]:
            s, sp = sens_spec(pos, flag)
            return {"sensitivity": _num(s), "sensitivity_ci95": _ci(bootstrap_ci(
                        lambda i: sens_spec(pos[i], flag[i])[0], n, reps, sd, strata)),
                    "specificity": _num(sp), "specificity_ci95": _ci(bootstrap_ci(
                        lambda i: sens_spec(pos[i], flag[i])[1], n, reps, sd + 1, strata)),
                    "flag_rate": _num(float(flag.mean())), "flag_rate_ci95": _ci(bootstrap_ci(
                        lambda i: float(flag[i].mean()), n, reps, sd + 2))}

        out["thresholds"][name] = {
            "labels": list(spec["labels"]), "probability": t, "ci95": _ci(t_ci_rule), "bundle": p_b,
            "target_sensitivity": tgt, "positives": int(pos.sum()), "looser": looser, "note": note,
            "site_with_bundle": figures(flagged_b, seed + 10), "site_calibrated": figures(score >= t, seed + 20)}
    return out


def document(result: dict[str, Any], cases: Cases, bundle: Bundle, *, source: str, by: str | None = None,
             command: str = "", reps: int = DEFAULT_REPS, seed: int = 0, created_at: str | None = None) -> dict[str, Any]:
    """The sealed calibration file's content."""
    from .store import now_iso

    who = by or f"{getpass.getuser()}@{socket.gethostname()}"
    by_label = Counter(bundle.labels[i] for i in cases.y.tolist())
    doc = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "model_id": bundle.model_id,
        "bundle_manifest_sha256": bundle.manifest_sha256, "created_at": created_at or now_iso(), "created_by": who,
        "command": command,
        "temperature": result["temperature"], "thresholds": result["thresholds"], "loosened": result["loosened"],
        "data": {"source": source, "cases": int(len(cases.y)), "by_label": dict(sorted(by_label.items())),
                 "positives": {k: v["positives"] for k, v in result["thresholds"].items()},
                 "excluded": len(cases.excluded), "notes": cases.notes, "bootstrap_resamples": reps,
                 "bootstrap_seed": seed, "interval": "percentile bootstrap 95%, positives and negatives resampled "
                                                     "separately for thresholds and sensitivities"},
    }
    return seal(doc)


def _fmt_ci(v: Any, ci: Any, pct: bool = False) -> str:
    if v is None:
        return "-"
    f = (lambda x: f"{x:.1%}") if pct else (lambda x: f"{x:.4g}")
    lo, hi = (ci or [None, None])[:2]
    return f"{f(v)} [{f(lo)}, {f(hi)}]" if lo is not None and hi is not None else f(v)


def render(doc: dict[str, Any]) -> list[str]:
    """The calibration as a person reads it: every number with its 95% interval, bundle's next to the site's."""
    t = doc["temperature"]
    lines = [f"calibration {doc['calibration_id']} for model {doc['model_id']}",
             f"  cases: {doc['data']['cases']} from {doc['data']['source']} ({', '.join(f'{k} {v}' for k, v in doc['data']['by_label'].items())})",
             f"  temperature: {_fmt_ci(t['value'], t['ci95'])} (bundle {t['bundle']:.4g})"]
    for name, r in doc["thresholds"].items():
        lines.append(f"  rule {name} (P({'+'.join(r['labels'])}), target sensitivity {r['target_sensitivity']:.0%}, "
                     f"{r['positives']} positives):")
        lines.append(f"    threshold: {_fmt_ci(r['probability'], r['ci95'])} (bundle {r['bundle']:g})"
                     f"{'  LOOSER than the bundle (--allow-looser)' if r['looser'] else ''}")
        for key, what in (("site_with_bundle", "bundle policy"), ("site_calibrated", "calibrated")):
            f = r[key]
            lines.append(f"    {what + ':':<15} sensitivity {_fmt_ci(f['sensitivity'], f['sensitivity_ci95'], True)}, "
                         f"specificity {_fmt_ci(f['specificity'], f['specificity_ci95'], True)}, flag rate "
                         f"{_fmt_ci(f['flag_rate'], f['flag_rate_ci95'], True)}")
        if r.get("note"):
            lines.append(f"    note: {r['note']}")
    for n in doc["data"].get("notes", []):
        lines.append(f"  note: {n}")
    return lines


# --- the command -------------------------------------------------------------------------------

def record_event(db_path: Path | None, kind: str, detail: str) -> bool:
    """An `events` row in the results database, if there is one (False when there is none or it is busy)."""
    if db_path is None or not Path(db_path).exists():
        return False
    from .store import StoreError, connect, now_iso

    try:
        conn = connect(Path(db_path))
    except StoreError:
        return False
    try:
        with conn:
            conn.execute("INSERT INTO events (at, kind, detail) VALUES (?, ?, ?)", (now_iso(), kind, detail))
        return True
    except sqlite3.Error:
        return False
    finally:
        conn.close()


def calibrate(bundle: Bundle, *, csv_path: Path | None, db_path: Path | None, settings: Any, target: float | None,
              allow_looser: bool, reps: int, seed: int, by: str | None, command: str,
              say: Any = print) -> dict[str, Any]:
    """Gather the cases (CSV or reviews), fit, and return the sealed document (not written yet)."""
    if csv_path is not None:
        files, notes = read_csv(csv_path, bundle)
        from .decode import QualityLimits

        s = settings
        limits = QualityLimits(s.min_sharpness, s.min_brightness, s.max_brightness, s.max_clipped_fraction)
        say(f"screening {len(files)} image(s) from {csv_path} with model {bundle.model_id}")
        cases = screen(files, bundle, max_pixels=s.max_pixels, max_file_mb=s.max_file_mb, limits=limits,
                       providers=s.providers, threads=s.threads)
        cases.notes[:0] = notes
        source = f"csv:{csv_path}"
    else:
        from .store import StoreError, connect

        if db_path is None:
            raise CalibrationError("pass --csv FILE (file,label lines) or --from-reviews with --db (the results "
                                   "database whose reviews hold the verdicts)")
        try:
            conn = connect(Path(db_path), readonly=True)
        except StoreError as e:
            raise CalibrationError(str(e)) from None
        try:
            cases = cases_from_reviews(conn, bundle)
        finally:
            conn.close()
        source = f"reviews:{db_path}"
    for name, why in cases.excluded:
        say(f"left out {name}: {why}")
    if cases.excluded:
        say(f"{len(cases.excluded)} case(s) left out (the agent would quarantine them, or their verdict names no "
            f"label); calibrating on the other {len(cases.y)}")
    result = fit(cases, bundle, target=target, allow_looser=allow_looser, reps=reps, seed=seed)
    doc = document(result, cases, bundle, source=source, by=by, command=command, reps=reps, seed=seed)
    doc["data"]["excluded_cases"] = [{"case": n, "why": w} for n, w in cases.excluded[:100]]
    return seal(doc)
