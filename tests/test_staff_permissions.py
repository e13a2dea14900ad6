"""Issue 17, clinic staff: a group of staff may read results and processed images, nobody else.

Before: the unit's UMask=0077 made processed/DATE/ 0700 and the database
0600, so only `sudo -u edge-agent` could read results, and a person outside
the agent's user got a traceback from `edge-agent results`. Now
`share_group` names the group that may read: the database and its -wal/-shm
0640, processed folders 0750 and the images the agent owns 0640, all with
that group, whatever the umask; the quarantine stays the agent's own. A
member of the group reads results (with the agent running or stopped) and
opens the images; a stranger gets a message that says what to ask for.

Three real users, by uid (setpriv): the agent, a member of the share group
and a stranger. Needs root (to switch users); skipped otherwise.
"""
from __future__ import annotations

import grp
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from faults import AgentProc, agent_env, distinct_images, outcome_count, site_args, wait_for, write_images
from faults import _nobody_can_run_agent

AGENT, STAFF, STRANGER = 65534, 64201, 64202


def _free_gid(start: int = 64200) -> int:
    gid = start
    while True:
        try:
            grp.getgrgid(gid)
        except KeyError:
            return gid
        gid -= 1


GROUP = _free_gid()


def as_user(uid: int, groups: tuple[int, ...] = ()) -> list[str]:
    exe = shutil.which("setpriv")
    assert exe
    return [exe, f"--reuid={uid}", f"--regid={uid if uid != AGENT else AGENT}",
            f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"]


def needs_users() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as three users (the agent, a member of the share group, a stranger)")
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to switch users")
    if not _nobody_can_run_agent(tuple(as_user(AGENT))):
        pytest.skip("an unprivileged user cannot run this interpreter/checkout (inside a 0700 folder?)")


def run(prefix: list[str], *args: str, umask: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "edge_agent", *args], env=agent_env(),
                          capture_output=True, text=True, timeout=180, cwd="/",
                          preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def shell(prefix: list[str], *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *cmd], capture_output=True, text=True, errors="replace", timeout=60, cwd="/")


def mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


@pytest.fixture
def site(bundle_dir: Path) -> Iterator[dict[str, Path]]:
    """A site under /tmp that the three users can reach (pytest's own folders are root-only), owned by the
    agent's user as tmpfiles would make it; the inbox setgid to the share group, as install.md says."""
    needs_users()
    work = Path(tempfile.mkdtemp(prefix="edge-share-", dir="/tmp"))
    os.chmod(work, 0o755)
    root = work / "site"
    dirs = {"root": root, "inbox": root / "inbox", "db": root / "db" / "results.db", "processed": root / "processed",
            "quarantine": root / "quarantine", "bundle": root / "bundle", "work": work}
    root.mkdir()
    dirs["inbox"].mkdir()
    shutil.copytree(bundle_dir, dirs["bundle"])
    for dirpath, dirnames, filenames in os.walk(root):
        for n in [dirpath, *(os.path.join(dirpath, x) for x in dirnames + filenames)]:
            os.lchown(n, AGENT, AGENT)
    os.chmod(root, 0o755)
    os.chown(dirs["inbox"], AGENT, GROUP)
    os.chmod(dirs["inbox"], 0o2770)
    try:
        yield dirs
    finally:
        shutil.rmtree(work, ignore_errors=True)


def drop(dirs: dict[str, Path], n: int, seed: int, sub: str = "") -> None:
    """Images dropped by the agent's user and by a member of the group (files that keep their owner)."""
    dest = dirs["inbox"] / sub if sub else dirs["inbox"]
    names = write_images(dest, distinct_images(n, seed=seed), prefix=f"s{seed}")
    for i, name in enumerate(sorted(names)):
        p = dest / name
        os.chown(p, STAFF if i == 0 else AGENT, GROUP)
        os.chmod(p, 0o660)  # what the inbox's default ACL gives a group member's file
    if sub:
        os.chown(dest, AGENT, GROUP)


def test_group_reads_results_and_images_strangers_nothing(site) -> None:
    drop(site, 3, seed=1731, sub="patient-4")
    # a hard-linked inbox file: the agent stores a copy it owns (fsafe), which must get the group too
    linked = site["root"] / "elsewhere.jpg"
    linked.write_bytes(distinct_images(5, seed=1732)[4])
    os.chown(linked, AGENT, AGENT)
    os.link(linked, site["inbox"] / "linked.jpg")
    (site["inbox"] / "junk.jpg").write_bytes(b"not an image" * 10)
    os.chown(site["inbox"] / "junk.jpg", AGENT, GROUP)
    agent = as_user(AGENT, (AGENT, GROUP))
    r = run(agent, "scan", *site_args(site, site["bundle"], "--share-group", str(GROUP), "--log-level", "WARNING"),
            umask=0o077)  # the old unit's umask: modes are set explicitly, not left to it
    assert r.returncode == 0, r.stderr
    assert outcome_count(site["db"]) == 5

    # what the agent made: the group may read, others nothing; the quarantine stays the agent's
    assert (mode(site["db"].parent), site["db"].parent.stat().st_gid) == (0o750, GROUP)
    assert (mode(site["db"]), site["db"].stat().st_gid) == (0o640, GROUP)
    assert mode(Path(f"{site['db']}.lock")) == 0o600
    folders = [site["processed"], *(p for p in site["processed"].rglob("*") if p.is_dir())]
    assert len(folders) >= 3 and all((mode(d) & 0o777, d.stat().st_gid) == (0o750, GROUP) for d in folders), \
        [(str(d), oct(mode(d)), d.stat().st_gid) for d in folders]
    images = list(site["processed"].rglob("*.jpg"))
    assert len(images) == 4
    for img in images:
        s = img.stat()
        if s.st_uid == AGENT:
            assert (mode(img), s.st_gid) == (0o640, GROUP), img
        else:  # a group member's own file keeps its owner and mode (only its owner may change them)
            assert s.st_uid == STAFF and s.st_gid == GROUP and mode(img) & 0o040, img
    copied = next(p for p in images if p.name == "linked.jpg")
    assert copied.stat().st_ino != linked.stat().st_ino and copied.stat().st_uid == AGENT
    assert mode(site["quarantine"]) == 0o700
    assert all(mode(p) == 0o700 for p in site["quarantine"].rglob("*") if p.is_dir())  # its files: the agent's only

    staff, stranger = as_user(STAFF, (GROUP,)), as_user(STRANGER)
    r = run(staff, "results", "--db", str(site["db"]), "--format", "ndjson")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 4, r.stderr
    assert run(staff, "quarantine", "--db", str(site["db"])).returncode == 0
    for img in images:
        assert shell(staff, "cat", str(img)).returncode == 0, img
    # read, never write: not the database, not the folders
    assert shell(staff, "touch", str(site["processed"] / "x")).returncode != 0
    w = shell(staff, sys.executable, "-c", f"import sqlite3; sqlite3.connect({str(site['db'])!r}).execute("
                                           "'DELETE FROM results').connection.commit()")
    assert w.returncode != 0
    assert outcome_count(site["db"]) == 5

    for cmd in ("results", "status", "quarantine"):
        r = run(stranger, cmd, "--db", str(site["db"]))
        assert r.returncode == 2, (cmd, r.stdout)
        assert "you may not read the database" in r.stderr and "share_group" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
    for img in images:
        assert shell(stranger, "cat", str(img)).returncode != 0, img
    assert shell(stranger, "ls", str(site["processed"])).returncode != 0


def test_group_reads_while_the_agent_runs(site, procs, tmp_path) -> None:
    agent = as_user(AGENT, (AGENT, GROUP))
    a = AgentProc("run", site_args(site, site["bundle"], "--share-group", str(GROUP), "--quiet-seconds", "0.2",
                                   "--log-level", "INFO"), site["work"] / "agent.log", prefix=agent, registry=procs)
    wait_for(lambda: "watching" in a.log(), what="the agent watching", proc=a)
    drop(site, 2, seed=1733)
    wait_for(lambda: outcome_count(site["db"]) == 2, what="two results", proc=a)
    for suffix in ("-wal", "-shm"):  # open while the agent runs: the group needs them to read
        side = Path(f"{site['db']}{suffix}")
        assert (mode(side), side.stat().st_gid) == (0o640, GROUP), suffix
    r = run(as_user(STAFF, (GROUP,)), "results", "--db", str(site["db"]), "--format", "ndjson")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, r.stderr
    a.term()
    assert a.wait() == 0
    # stopped: SQLite removed -wal/-shm; the group still reads (it may not create them)
    assert not Path(f"{site['db']}-wal").exists()
    r = run(as_user(STAFF, (GROUP,)), "results", "--db", str(site["db"]), "--format", "ndjson")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2, r.stderr


def test_private_without_a_share_group(site) -> None:
    drop(site, 2, seed=1734, sub="p")
    r = run(as_user(AGENT, (AGENT, GROUP)), "scan", *site_args(site, site["bundle"], "--log-level", "WARNING"),
            umask=0)
    assert r.returncode == 0, r.stderr
    assert mode(site["db"]) == 0o600 and mode(site["db"].parent) == 0o700
    assert all(mode(d) == 0o700 for d in site["processed"].rglob("*") if d.is_dir())
    r = run(as_user(STAFF, (GROUP,)), "results", "--db", str(site["db"]))
    assert r.returncode == 2 and "you may not read the database" in r.stderr, r.stderr


def test_share_group_must_exist_and_be_one_of_the_agents_groups(site) -> None:
    r = run(as_user(AGENT, (AGENT,)), "scan", *site_args(site, site["bundle"], "--share-group", str(GROUP)))
    assert r.returncode == 2 and "is not one of the agent's groups" in r.stderr, r.stderr
    assert "Group=" in r.stderr and "Traceback" not in r.stderr
    r = run(as_user(AGENT, (AGENT,)), "scan", *site_args(site, site["bundle"], "--share-group",
                                                         "no-such-group-17"))
    assert r.returncode == 2 and "is not a group on this system" in r.stderr, r.stderr
    assert not site["db"].exists()
