"""Bundle signatures: one definition of the format, shared by build_model (signs) and edge_agent (verifies).

Why: manifest.json holds the checksums of every model file, the thresholds,
the labels and the preprocessing. Without a signature over it, anyone who can
write to the bundle folder can raise every threshold or swap two labels and
the agent would run it under the same model_id. The signature is a detached
Ed25519 signature over the exact bytes of manifest.json, kept next to it in
`manifest.sig` (docs/bundle-format.md), checked against public keys the
device trusts: the project's key shipped in the package
(`edge_agent/keys/project.pub`) plus the keys a site's administrator lists in
`trusted_keys`.

Key files are standard PEM (what `openssl genpkey -algorithm ed25519` writes):
a private key is PKCS#8 "PRIVATE KEY", a public key is SubjectPublicKeyInfo
"PUBLIC KEY". The signature covers the raw manifest bytes with no prefix, so
`openssl pkeyutl -verify -rawin` can check it too.

Nothing here reads more than a few KiB from a file it did not write: the
signature and key files come from the same untrusted folders as the bundle.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIG_FILE = "manifest.sig"
SIG_FORMAT = "edge-derm-screen/manifest-signature"
SIG_VERSION = 1
ALGORITHM = "ed25519"
MAX_SIG_BYTES = 4096
MAX_KEY_BYTES = 16384
PROJECT_KEY_NAME = "project.pub"


class SigningError(ValueError):
    """A key or signature file cannot be used; the message names the file and what to do."""


def project_key_path() -> Path:
    """The project's public key, shipped inside the package: it signs the bundle in edge_agent/bundle/."""
    return Path(__file__).resolve().parent / "keys" / PROJECT_KEY_NAME


def read_small(path: Path, limit: int, what: str) -> bytes:
    """Read a regular file of at most `limit` bytes, without following a symlink and without blocking on a FIFO.

    Raises FileNotFoundError when it does not exist and SigningError when it is not a small regular file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise
    except OSError as e:
        raise SigningError(f"{what} {path} cannot be opened ({e.strerror or e}); it must be a regular file, "
                           "not a symlink") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SigningError(f"{what} {path} is not a regular file; replace it with the file itself")
        if st.st_size > limit:
            raise SigningError(f"{what} {path} is {st.st_size} bytes, more than the {limit} such a file can be; "
                               "it is not what it claims to be - replace it with the real one")
        data = os.read(fd, limit + 1)
        if len(data) > limit:
            raise SigningError(f"{what} {path} is larger than {limit} bytes; replace it with the real one")
        return data
    finally:
        os.close(fd)


# --- keys --------------------------------------------------------------------------------

def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    """Short, stable name of a public key: 'ed25519:' + the first 16 hex digits of sha256(raw key)."""
    return f"{ALGORITHM}:{hashlib.sha256(raw_public(key)).hexdigest()[:16]}"


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file, or SigningError saying what is wrong with the file."""
    try:
        data = read_small(path, MAX_KEY_BYTES, "public key file")
    except FileNotFoundError:
        raise SigningError(f"public key file {path} does not exist: fix trusted_keys (--trusted-key, "
                           "EDGE_AGENT_TRUSTED_KEYS) or copy the site's .pub file there") from None
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        hint = (" (this looks like a PRIVATE key: never copy private keys to a device; trust the .pub file)"
                if b"PRIVATE KEY" in data else "")
        raise SigningError(f"{path} is not a PEM public key ({e}){hint}; create one with `build-model keygen`") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SigningError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key; bundles are signed "
                           "with Ed25519 keys from `build-model keygen`")
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """An Ed25519 private key from an unencrypted PKCS#8 PEM file (as `build-model keygen` writes)."""
    try:
        data = read_small(path, MAX_KEY_BYTES, "private key file")
    except FileNotFoundError:
        raise SigningError(f"private key file {path} does not exist: pass the key written by "
                           "`build-model keygen`") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise SigningError(f"{path} is not an unencrypted PEM private key ({e}); create one with "
                           "`build-model keygen`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path} holds a {type(key).__name__}, not an Ed25519 private key")
    return key


def write_keypair(private_path: Path, public_path: Path, key: Ed25519PrivateKey | None = None) -> str:
    """Create a new key pair: the private key 0600 (never overwritten), the public key next to where asked.

    Returns the key id. The private key stays on the build machine; only the .pub file goes to devices.
    """
    key = key or Ed25519PrivateKey.generate()
    for p in (private_path, public_path):
        if p.exists():
            raise SigningError(f"{p} already exists: refusing to overwrite a key; choose another path or move "
                               "the old key away first")
    private_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, private_pem(key))
        os.fsync(fd)
    finally:
        os.close(fd)
    public_path.parent.mkdir(parents=True, exist_ok=True)
    public_path.write_bytes(public_pem(key.public_key()))
    return key_id(key.public_key())


# --- trust -------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrustedKey:
    key: Ed25519PublicKey
    key_id: str
    source: str  # where it came from, for messages: "project key <path>" or "<path> (trusted_keys)"
    path: Path
    project: bool = False


@dataclass(frozen=True)
class Trust:
    """What a device accepts: bundles signed by one of `keys`, or any bundle when `allow_unsigned`."""

    keys: tuple[TrustedKey, ...]
    allow_unsigned: bool = False

    def find(self, raw: bytes) -> TrustedKey | None:
        return next((k for k in self.keys if raw_public(k.key) == raw), None)


def make_trust(trusted_keys: Iterable[Path] = (), allow_unsigned: bool = False,
               include_project: bool = True) -> Trust:
    """The project's key (unless `include_project` is False) plus the listed public key files."""
    keys: list[TrustedKey] = []
    if include_project:
        p = project_key_path()
        if not p.is_file():
            raise SigningError(f"the project's public key {p} is missing from the installed package: reinstall "
                               "edge-agent (the key verifies the shipped model bundle)")
        k = load_public_key(p)
        keys.append(TrustedKey(k, key_id(k), f"project key {p}", p, project=True))
    for path in trusted_keys:
        k = load_public_key(Path(path))
        keys.append(TrustedKey(k, key_id(k), f"{path} (trusted_keys)", Path(path)))
    return Trust(tuple(keys), allow_unsigned)


def trust_from_settings(settings: Any) -> Trust:
    """The trust a configured agent applies (settings.trusted_keys, settings.allow_unsigned_bundle);
    an unusable key file is a ConfigError, so the CLI exits 2 with the message."""
    from .config import ConfigError

    try:
        return make_trust(settings.trusted_keys, settings.allow_unsigned_bundle)
    except SigningError as e:
        raise ConfigError(f"trusted_keys: {e}") from None


def trust_from_environ(environ: Mapping[str, str] | None = None) -> Trust:
    """The trust applied when a library caller passes none: the project key plus what the environment
    configures (EDGE_AGENT_TRUSTED_KEYS, EDGE_AGENT_ALLOW_UNSIGNED_BUNDLE), parsed exactly as the CLI
    parses them, so `verify_bundle(path)` agrees with `edge-agent model verify PATH` without a config file."""
    from .config import ENV_PREFIX, _coerce

    env = os.environ if environ is None else environ
    paths: Sequence[Path] = ()
    allow = False
    raw = env.get(ENV_PREFIX + "TRUSTED_KEYS")
    if raw:
        paths = _coerce("trusted_keys", raw, f"environment {ENV_PREFIX}TRUSTED_KEYS")
    raw = env.get(ENV_PREFIX + "ALLOW_UNSIGNED_BUNDLE")
    if raw:
        allow = _coerce("allow_unsigned_bundle", raw, f"environment {ENV_PREFIX}ALLOW_UNSIGNED_BUNDLE")
    return make_trust(paths, allow)


# --- signatures --------------------------------------------------------------------------

def sign_manifest(manifest_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    """The manifest.sig content for these exact manifest bytes."""
    pub = key.public_key()
    doc = {
        "format": SIG_FORMAT,
        "version": SIG_VERSION,
        "algorithm": ALGORITHM,
        "key_id": key_id(pub),
        "public_key": base64.b64encode(raw_public(pub)).decode("ascii"),
        "manifest_sha256": hashlib.sha256(manifest_bytes).hexdigest(),
        "signature": base64.b64encode(key.sign(manifest_bytes)).decode("ascii"),
    }
    return (json.dumps(doc, indent=2) + "\n").encode("ascii")


def sign_bundle(bundle: Path, key: Ed25519PrivateKey, manifest_name: str = "manifest.json") -> str:
    """Write `bundle`/manifest.sig for the manifest as it is on disk now (atomically); returns the key id."""
    data = (bundle / manifest_name).read_bytes()
    tmp = bundle / (SIG_FILE + ".tmp")
    tmp.write_bytes(sign_manifest(data, key))
    tmp.replace(bundle / SIG_FILE)
    return key_id(key.public_key())


@dataclass(frozen=True)
class SignatureCheck:
    """Outcome of checking manifest.sig.

    status: "valid" (a trusted key signed these exact bytes), "missing" (no manifest.sig), "untrusted"
    (a correct signature by a key this device does not trust), "invalid" (the signature does not match
    the manifest, or manifest.sig is damaged).
    """

    status: str
    message: str
    key_id: str | None = None
    trusted_by: str | None = None

    @property
    def valid(self) -> bool:
        return self.status == "valid"

    @property
    def allowable(self) -> bool:
        """Whether allow_unsigned_bundle may accept it: a missing or merely untrusted signature. An invalid
        one means the manifest changed after signing, which no setting accepts (delete manifest.sig to run
        a deliberately edited bundle unsigned)."""
        return self.status in ("missing", "untrusted")

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "key_id": self.key_id, "trusted_by": self.trusted_by, "message": self.message}


def check_signature(manifest_bytes: bytes, sig_bytes: bytes | None, trust: Trust) -> SignatureCheck:
    """Check manifest.sig content against the manifest bytes and the trusted keys; never raises."""
    if sig_bytes is None:
        return SignatureCheck("missing", f"the bundle is not signed (no {SIG_FILE}): sign it with `build-model sign "
                              "--bundle DIR --key KEYFILE` and trust that key's .pub on this device (trusted_keys), "
                              "or set allow_unsigned_bundle = true to run it anyway")
    try:
        doc = json.loads(sig_bytes.decode("ascii"))
        if not isinstance(doc, dict) or doc.get("format") != SIG_FORMAT:
            raise ValueError(f"not a {SIG_FORMAT} document")
        if doc.get("version") != SIG_VERSION or doc.get("algorithm") != ALGORITHM:
            raise ValueError(f"version {doc.get('version')!r} / algorithm {doc.get('algorithm')!r} is not "
                             f"{SIG_VERSION} / {ALGORITHM} (a newer agent may understand it)")
        raw = base64.b64decode(str(doc.get("public_key")), validate=True)
        sig = base64.b64decode(str(doc.get("signature")), validate=True)
        pub = Ed25519PublicKey.from_public_bytes(raw)
    except (UnicodeDecodeError, ValueError, binascii.Error, TypeError) as e:
        return SignatureCheck("invalid", f"{SIG_FILE} is damaged ({e}); re-copy the bundle from its source, or "
                              "re-sign it with `build-model sign`")
    kid = key_id(pub)
    try:
        pub.verify(sig, manifest_bytes)
    except InvalidSignature:
        changed = doc.get("manifest_sha256") not in (None, hashlib.sha256(manifest_bytes).hexdigest())
        why = ("manifest.json was modified after it was signed" if changed
               else "the signature does not match manifest.json")
        return SignatureCheck("invalid", f"{why} (signed by {kid}): the thresholds, labels or file checksums may "
                              "have been tampered with; do not run this bundle - re-copy it from its source",
                              key_id=kid)
    trusted = trust.find(raw)
    if trusted is None:
        known = ", ".join(k.key_id for k in trust.keys) or "none"
        return SignatureCheck("untrusted", f"the bundle is signed by key {kid}, which this device does not trust "
                              f"(trusted: {known}); if it is your site's key, add its .pub file to trusted_keys "
                              "(--trusted-key, EDGE_AGENT_TRUSTED_KEYS or the config file)", key_id=kid)
    return SignatureCheck("valid", f"signed by {kid} ({trusted.source})", key_id=kid, trusted_by=trusted.source)
