#!/usr/bin/env bash
# Proof on aarch64 (issue 14, item 7): the agent from its wheel, with the pip registry's aarch64 wheels, in a
# Debian bookworm arm64 root file system run under qemu-user emulation; it screens examples/images and the
# probabilities must equal this machine's (x86-64) to 1e-3; then the agent's fast tests run there.
#
#   sudo PYTHON=/path/to/venv/bin/python scripts/aarch64-e2e.sh [> docs/proofs/aarch64-e2e.txt]
#
# Needs: root, mmdebstrap and qemu-user-static (Debian packages; binfmt_misc is mounted and the qemu-aarch64
# entry enabled here if needed), the Debian mirror once (the root file system is cached as a tarball in
# $E2E_CACHE, default ~/.cache/edge-agent-e2e), the pip registry, and a PYTHON with this project installed
# (the x86-64 reference). Exit status: 0 passed, 1 a check failed, 77 cannot run here (reason printed).
#
# Optional, on real images: AARCH64_DATA=/work/shared/data (the folder holding the bundle's data sources; only
# read, the sampled files are copied) screens AARCH64_HAM (400) HAM10000 and AARCH64_ISIC (200) ISIC 2017
# test-split images (edge_agent/bundle/split.csv, fixed sample) with INT8 and FP32 on both platforms, with the
# agent's own decode, Engine and screen_batch (scripts/aarch64_sample.py), and compares probabilities and
# decisions (label, review flag and reasons, high-risk rules, OOD flag) image by image.
#
# Timings under emulation mean nothing (qemu translates every instruction; NEON becomes scalar host code),
# so none are reported as speed. What this does prove: the aarch64 wheels of onnxruntime, numpy, OpenCV
# and the rest install on bookworm's Python 3.11, the agent's code runs on them, and the INT8 model gives
# the same answers as on x86-64 (onnxruntime's aarch64 kernels, run instruction by instruction).
set -u -o pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${E2E_CACHE:-$HOME/.cache/edge-agent-e2e}
PYTHON=${PYTHON:-python3}
KEEP=${KEEP:-0}
# The fast tests run on aarch64: the image path end to end, and what depends on the CPU's arithmetic.
TESTS=${AARCH64_TESTS:-"tests/test_agent_preprocess.py tests/test_agent_decode.py tests/test_agent_infer.py tests/test_agent_triage.py tests/test_agent_store.py tests/test_agent_scan.py tests/test_harden_corrupt_images.py"}
SUMMARY=()
FAILS=0
pass() { SUMMARY+=("PASS  $*"); echo "PASS: $*"; }
fail() { SUMMARY+=("FAIL  $*"); echo "FAIL: $*"; FAILS=$((FAILS + 1)); }
step() { echo; echo "=== $*"; }
cannot() { echo "CANNOT RUN: $*"; exit 77; }

[ "$(id -u)" = 0 ] || cannot "needs root (chroot, mounts, binfmt_misc)"
for c in unshare chroot tar mmdebstrap; do
    command -v "$c" >/dev/null || cannot "no '$c' on this machine (apt-get install mmdebstrap)"
done
[ -x /usr/bin/qemu-aarch64-static ] || cannot "no /usr/bin/qemu-aarch64-static (apt-get install qemu-user-static)"
"$PYTHON" -c "import edge_agent, pip" 2>/dev/null || cannot "PYTHON=$PYTHON has no edge_agent (the x86-64 reference) or pip"
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc 2>/dev/null || cannot "cannot mount binfmt_misc"
fi
if ! grep -qs enabled /proc/sys/fs/binfmt_misc/qemu-aarch64; then
    update-binfmts --enable qemu-aarch64 2>/dev/null || cannot "cannot register qemu-aarch64 with binfmt_misc (update-binfmts)"
fi
grep -qs enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 || cannot "qemu-aarch64 is not registered with binfmt_misc"

echo "# scripts/aarch64-e2e.sh, $(date -u '+%Y-%m-%d %H:%M:%S UTC'), host $(uname -m), kernel $(uname -r)"
echo "# repo commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null)$(git -C "$REPO" diff --quiet 2>/dev/null || echo '+changes')"
echo "# $(/usr/bin/qemu-aarch64-static --version | head -1)"

WORK=$(mktemp -d /var/tmp/edge-agent-aarch64-e2e.XXXXXX)
ROOT=$WORK/root
cleanup() { if [ "$KEEP" = 1 ]; then echo "kept $WORK"; else rm -rf "$WORK"; fi; }
trap cleanup EXIT

step "root file system (Debian bookworm arm64, python3)"
mkdir -p "$CACHE"
TAR=$CACHE/bookworm-arm64-python.tar
if [ ! -s "$TAR" ]; then
    mmdebstrap --arch=arm64 --variant=minbase --include=python3,python3-venv,ca-certificates bookworm \
        "${TAR%.tar}.part.tar" >"$WORK/mmdebstrap.log" 2>&1 \
        || { tail -5 "$WORK/mmdebstrap.log"; cannot "mmdebstrap could not build the arm64 root file system"; }
    mv "${TAR%.tar}.part.tar" "$TAR"
    echo "built $TAR"
else
    echo "cached $TAR ($(du -h "$TAR" | cut -f1))"
fi
mkdir -p "$ROOT"
tar -xf "$TAR" -C "$ROOT"
# Run a command in the arm64 root: own mount namespace (proc, /dev, a tmpfs /tmp), nothing left behind.
arm() {
    unshare --mount --fork /bin/sh -c 'mount -t proc proc "$1/proc" && mount --rbind /dev "$1/dev" &&
        mount --make-rslave "$1/dev" && shift && exec chroot "$@"' sh "$ROOT" "$ROOT" /usr/bin/env -i \
        PATH=/opt/edge-agent/venv/bin:/usr/bin:/bin HOME=/root LANG=C.UTF-8 "$@"
}
echo "inside: $(arm /bin/uname -m), $(arm /usr/bin/python3 -c 'import platform, sys; print(platform.machine(), sys.version.split()[0])')"
[ "$(arm /bin/uname -m)" = aarch64 ] && pass "arm64 root file system runs under qemu-user (uname -m: aarch64)" \
    || { fail "the arm64 root file system does not run"; exit 1; }

step "agent wheel with the registry's aarch64 wheels"
mkdir -p "$WORK/wheels"
"$PYTHON" -m pip wheel "$REPO" --no-deps -q -w "$WORK/wheels" >"$WORK/pip.log" 2>&1 || { cat "$WORK/pip.log"; cannot "pip wheel failed"; }
WHEEL=$(ls "$WORK"/wheels/edge_derm_screen-*.whl)
"$PYTHON" -m pip download -q --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
    --platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
    --platform manylinux_2_34_aarch64 -d "$WORK/wheels" "$WHEEL[test]" >>"$WORK/pip.log" 2>&1 \
    || { tail -5 "$WORK/pip.log"; cannot "pip download of the aarch64 wheels failed (registry unreachable?)"; }
ls "$WORK/wheels" | grep -E 'aarch64' | sed 's/^/  /'
cp -r "$WORK/wheels" "$ROOT/tmp/wheels"
arm /usr/bin/python3 -m venv /opt/edge-agent/venv
if arm /opt/edge-agent/venv/bin/pip install -q --no-index --find-links /tmp/wheels "/tmp/wheels/$(basename "$WHEEL")[test]" >>"$WORK/pip.log" 2>&1; then
    pass "installed $(basename "$WHEEL")[test] on aarch64: $(arm /opt/edge-agent/venv/bin/pip list --format=freeze 2>/dev/null | grep -iE '^(onnxruntime|numpy|opencv-python-headless|watchdog|sqlite-utils|cryptography)=' | tr '\n' ' ')"
else
    tail -20 "$WORK/pip.log"; fail "installing the wheel on aarch64"; exit 1
fi
arm /opt/edge-agent/venv/bin/python -c "import onnxruntime as o, numpy, cv2, platform; print('aarch64 runtime:', platform.machine(), 'onnxruntime', o.__version__, o.get_available_providers(), 'numpy', numpy.__version__, 'opencv', cv2.__version__)"

step "screen examples/images on aarch64 and on x86-64"
mkdir -p "$ROOT/tmp/screen/inbox" "$WORK/x86/inbox"
cp "$REPO"/examples/images/*.jpg "$ROOT/tmp/screen/inbox/"
cp "$REPO"/examples/images/*.jpg "$WORK/x86/inbox/"
SCAN=(scan --after keep --spot-check-fraction 0)
arm /opt/edge-agent/venv/bin/edge-agent "${SCAN[@]}" --inbox /tmp/screen/inbox --db /tmp/screen/results.db >"$WORK/arm-scan.log" 2>&1
echo "aarch64 scan exit status $? ($(tail -1 "$WORK/arm-scan.log"))"
"$PYTHON" -m edge_agent "${SCAN[@]}" --inbox "$WORK/x86/inbox" --db "$WORK/x86/results.db" >"$WORK/x86-scan.log" 2>&1
echo "x86-64 scan exit status $? ($(tail -1 "$WORK/x86-scan.log"))"
"$PYTHON" - "$ROOT/tmp/screen/results.db" "$WORK/x86/results.db" <<'EOF'
import json, sqlite3, sys
def load(db):
    c = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    return {r[0]: (r[1], r[2], r[3], json.loads(r[4]), r[5], r[6]) for r in
            c.execute("SELECT original_name, model_id, model_variant, label, probabilities, needs_review, "
                      "coalesce(review_reasons, '') FROM results")}
arm, x86 = load(sys.argv[1]), load(sys.argv[2])
print(f"results: aarch64 {len(arm)}, x86-64 {len(x86)}; model {next(iter(arm.values()))[0] if arm else '?'}")
worst, same = 0.0, True
print(f"{'image':<18} {'variant':<7} {'label a64/x86':<13} {'review a64/x86':<36} max |dp|")
for name in sorted(x86):
    if name not in arm:
        print(f"{name:<18} missing on aarch64"); same = False; continue
    a, x = arm[name], x86[name]
    d = max(abs(a[3][k] - x[3][k]) for k in x[3]) if set(a[3]) == set(x[3]) else 1.0
    worst = max(worst, d)
    same = same and a[2] == x[2] and a[4] == x[4] and a[5] == x[5]
    print(f"{name:<18} {a[1]:<7} {a[2] + '/' + x[2]:<13} {(a[5] or '-') + ' / ' + (x[5] or '-'):<36} {d:.2e}")
print(f"largest probability difference over all images and classes: {worst:.2e} (bar: 1e-3)")
sys.exit((0 if worst <= 1e-3 else 1) | (0 if same and len(arm) == len(x86) == 12 else 2))
EOF
rc=$?
[ $((rc & 2)) = 0 ] && pass "12 example images screened on aarch64: the same label and the same review flags as on x86-64 for every image" \
    || fail "aarch64 labels or review flags differ from x86-64 (or images missing)"
[ $((rc & 1)) = 0 ] && pass "the screened probabilities (INT8 model) are within 1e-3 of x86-64" \
    || fail "the screened probabilities (INT8 model) differ from x86-64 by more than 1e-3 (see the next step for where)"

step "where a difference comes from: the preprocessed tensor, the FP32 model, the INT8 model"
# The same probe on both machines: decode + preprocess each example in-process, run both variants directly.
cat >"$WORK/probe.py" <<'EOF'
import sys
from pathlib import Path
import numpy as np, onnxruntime as ort
from edge_agent.bundle import default_bundle_path, load_bundle
from edge_agent.decode import QualityLimits, decode_image
b = load_bundle(default_bundle_path())
so = ort.SessionOptions()
so.log_severity_level = 3
sessions = {v: ort.InferenceSession(b.model_bytes(v), so, providers=["CPUExecutionProvider"]) for v in ("fp32", "int8")}
out = {}
for p in sorted(Path(sys.argv[1]).glob("*.jpg")):
    t = decode_image(p.read_bytes(), b.preprocessing, 64_000_000, QualityLimits()).tensor[None].astype(np.float32)
    out[f"{p.name}:tensor"] = t
    for v, s in sessions.items():
        z = s.run(None, {s.get_inputs()[0].name: t})[0][0] / b.temperature
        e = np.exp(z - z.max())
        out[f"{p.name}:{v}"] = e / e.sum()
np.savez(sys.argv[2], **out)
EOF
cp "$WORK/probe.py" "$ROOT/tmp/probe.py"
cp -r "$REPO/examples/images" "$ROOT/tmp/probe-images"
arm /opt/edge-agent/venv/bin/python /tmp/probe.py /tmp/probe-images /tmp/probe-arm.npz 2>/dev/null
"$PYTHON" "$WORK/probe.py" "$REPO/examples/images" "$WORK/probe-x86.npz"
"$PYTHON" - "$ROOT/tmp/probe-arm.npz" "$WORK/probe-x86.npz" "$WORK/probe" <<'EOF'
import sys
import numpy as np
a, x = np.load(sys.argv[1]), np.load(sys.argv[2])
for kind, what in (("tensor", "preprocessed input (decode, resize, colour constancy, normalise)"),
                   ("fp32", "FP32 model, class probabilities"), ("int8", "INT8 model, class probabilities")):
    keys = [k for k in x.files if k.endswith(":" + kind)]
    d = max(float(np.abs(a[k] - x[k]).max()) for k in keys)
    print(f"  max |aarch64 - x86-64| {d:.2e}  {what} ({len(keys)} images)")
    open(sys.argv[3] + "." + kind, "w").write(f"{d:.2e}")
names = sorted({k.split(":")[0] for k in x.files})
for label, d in (("aarch64", a), ("x86-64", x)):
    q = [float(np.abs(d[n + ":int8"] - d[n + ":fp32"]).max()) for n in names]
    print(f"  {label}: INT8 vs its own FP32, max {max(q):.2e}, mean {np.mean(q):.2e} (the quantisation error)")
EOF
t=$(cat "$WORK/probe.tensor"); f=$(cat "$WORK/probe.fp32"); i=$(cat "$WORK/probe.int8")
[ "$t" = "0.00e+00" ] && pass "preprocessing (decode, resize, colour constancy, normalisation) is bit-identical on aarch64 and x86-64" \
    || fail "the preprocessed tensors differ between aarch64 and x86-64 (max $t)"
"$PYTHON" -c "import sys; sys.exit(0 if float(sys.argv[1]) <= 1e-3 else 1)" "$f" \
    && pass "FP32 model: probabilities within 1e-3 of x86-64 (max difference $f)" \
    || fail "FP32 model: probabilities differ from x86-64 by $f"
# A reproducible INT8 model (build-model quantize --reproducible, the default bundle's) computes exactly; a plain
# one puts float rounding in front of its quantizers and answers up to ~1e-2 apart (docs/aarch64.md).
REPRO=$("$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))['gate'].get('int8_reproducible', False))" \
    "$REPO/edge_agent/bundle/manifest.json")
"$PYTHON" -c "import sys; sys.exit(0 if float(sys.argv[1]) <= 1e-3 else 1)" "$i" \
    && pass "INT8 model: probabilities within 1e-3 of x86-64 (max difference $i; manifest int8_reproducible: $REPRO)" \
    || fail "INT8 model: probabilities differ from x86-64 by $i (manifest int8_reproducible: $REPRO; a plain INT8 model rounds differently per CPU, see docs/aarch64.md)"

if [ -n "${AARCH64_DATA:-}" ]; then
    # Optional (AARCH64_DATA=<folder holding the build's data sources, e.g. /work/shared/data>): the same question
    # on real images: the probabilities, and what a clinician sees: label, review flag and reasons, high-risk
    # rules, OOD flag, per image.
    HAM_N=${AARCH64_HAM:-400}; ISIC_N=${AARCH64_ISIC:-200}
    step "decisions on real images: $HAM_N HAM10000 + $ISIC_N ISIC 2017 test-split images, INT8 and FP32, aarch64 vs x86-64"
    if ! "$PYTHON" "$REPO/scripts/aarch64_sample.py" select --split "$REPO/edge_agent/bundle/split.csv" \
            --data "$AARCH64_DATA" --out "$ROOT/tmp/sample" --ham "$HAM_N" --isic "$ISIC_N"; then
        fail "could not copy the real-image sample from AARCH64_DATA=$AARCH64_DATA"
    else
        cp "$REPO/scripts/aarch64_sample.py" "$ROOT/tmp/aarch64_sample.py"
        arm /opt/edge-agent/venv/bin/python /tmp/aarch64_sample.py screen --images /tmp/sample \
            --out /tmp/sample-arm.json 2>"$WORK/sample-arm.err" || tail -5 "$WORK/sample-arm.err"
        "$PYTHON" "$REPO/scripts/aarch64_sample.py" screen --images "$ROOT/tmp/sample" --out "$WORK/sample-x86.json"
        if [ -s "$ROOT/tmp/sample-arm.json" ] && [ -s "$WORK/sample-x86.json" ]; then
            "$PYTHON" "$REPO/scripts/aarch64_sample.py" compare "$ROOT/tmp/sample-arm.json" "$WORK/sample-x86.json" \
                --summary "$WORK/sample-summary.json"
            rc=$?
            sample_sum() { "$PYTHON" -c "import json, sys; s = json.load(open(sys.argv[1]))[sys.argv[2]]; print(f\"{s['$1']}\")" "$WORK/sample-summary.json" "$2"; }
            N=$(sample_sum n int8)
            [ $((rc & 1)) = 0 ] && pass "real images: INT8 probabilities within 1e-3 of x86-64 on all $N" \
                || fail "real images: INT8 probabilities differ from x86-64 by up to $(sample_sum max int8) (bar 1e-3; manifest int8_reproducible: $REPRO)"
            [ $((rc & 2)) = 0 ] && pass "real images: INT8 decisions (label, review flag and reasons, high-risk rules, OOD flag) identical to x86-64 on all $N" \
                || fail "real images: INT8 decisions differ from x86-64 on $(sample_sum any int8) of $N images (listed above)"
            [ $((rc & 4)) = 0 ] && pass "real images: FP32 probabilities within 1e-3 of x86-64 on all $N (max difference $(sample_sum max fp32))" \
                || fail "real images: FP32 probabilities differ from x86-64 by up to $(sample_sum max fp32)"
            [ $((rc & 8)) = 0 ] && pass "real images: FP32 decisions identical to x86-64 on all $N" \
                || fail "real images: FP32 decisions differ from x86-64 on $(sample_sum any fp32) of $N images (listed above)"
        else
            fail "real images: screening the sample failed ($(tail -1 "$WORK/sample-arm.err"))"
        fi
    fi
fi

step "fast tests on aarch64: $TESTS"
mkdir -p "$ROOT/opt/edge-agent/src"
cp -r "$REPO/tests" "$REPO/examples" "$REPO/pyproject.toml" "$ROOT/opt/edge-agent/src/"
# The tests import edge_agent from the installed wheel (no source tree beside them): the aarch64 install.
arm /bin/sh -c "cd /opt/edge-agent/src && /opt/edge-agent/venv/bin/python -m pytest -q -p no:cacheprovider $TESTS" \
    >"$WORK/pytest.log" 2>&1
rc=$?
# pytest's duration is emulated time: left out, as every other timing of this run.
grep -E "passed|failed|error" "$WORK/pytest.log" | tail -3 | sed -E 's/ in [0-9.]+s( \([0-9:]+\))?//' 
arm /bin/sh -c "cd /opt/edge-agent/src && /opt/edge-agent/venv/bin/python -c 'import edge_agent; print(\"edge_agent imported from\", edge_agent.__file__)'"
[ $rc = 0 ] && pass "fast tests on aarch64: $(grep -oE '[0-9]+ passed' "$WORK/pytest.log" | tail -1) ($TESTS)" \
    || { tail -40 "$WORK/pytest.log"; fail "fast tests on aarch64 (exit $rc)"; }

echo
echo "=== summary"
printf '%s\n' "${SUMMARY[@]}"
echo
echo "Not shown here: speed. Under qemu-user every aarch64 instruction is translated; no timing from this run"
echo "says anything about a Raspberry Pi (docs/aarch64.md has what is known). Not run on aarch64: the daemon"
echo "tests that need inotify timing, systemd, or minutes of emulated CPU (the fault and hostile suites)."
[ "$FAILS" = 0 ] && { echo "ALL PASSED"; exit 0; } || { echo "$FAILS FAILED"; exit 1; }
