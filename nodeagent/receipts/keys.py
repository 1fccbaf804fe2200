"""The machine's signing key: Ed25519 through `cryptography`; verification through libsodium.

Key id = lowercase hex SHA-256 of the DER SubjectPublicKeyInfo (sigstore's
convention), so anyone holding the public key computes the same id.

Keys are loaded, generated, stored and used for signing with `cryptography`
(OpenSSL). Signatures are verified with libsodium (PyNaCl) by default: about
twice as fast as OpenSSL's Ed25519 verify on the machines measured (see
bench/README.md), and stricter — it refuses non-canonical encodings and
small-order public keys or R points, which no honest signer produces (OpenSSL
accepts, e.g., the all-zero-scalar signature under the identity-point key for
every message). `set_verify_backend("openssl")` selects `cryptography` again,
for benchmarks and cross-checks; the choice is per process.

Where the private key comes from (`resolve_key_source`), first match wins:

1. an explicit file (``--key-file``, config ``receipts.key_file``);
2. a systemd credential ``$CREDENTIALS_DIRECTORY/receipt-signing-key``
   (``LoadCredential=receipt-signing-key:/path``);
3. ``<state dir>/keys/machine.key``, generated on first use (PKCS#8 PEM,
   mode 0600, written atomically in a 0700 directory).

Only the last is managed by us (and can be replaced by `key rotate`); the
other two belong to the operator and are never written.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from nacl.bindings import crypto_sign_open
from nacl.exceptions import BadSignatureError

from nodeagent.fsutil import atomic_write_bytes, ensure_private_dir, fsync_dir
from nodeagent.receipts.errors import KeyFileError

CREDENTIAL_NAME = "receipt-signing-key"
STATE_KEY_PATH = Path("keys") / "machine.key"


SIGNATURE_SIZE = 64
VERIFY_BACKENDS = ("sodium", "openssl")
_verify_backend = "sodium"


def set_verify_backend(name: str) -> str:
    """Verify signatures with ``sodium`` (libsodium, the default) or ``openssl`` (`cryptography`).

    Returns the previous choice. Process-wide, and inherited by forked
    verification workers; meant for benchmarks and cross-checks.
    """
    global _verify_backend
    if name not in VERIFY_BACKENDS:
        raise ValueError(f"unknown Ed25519 verify backend {name!r}; choose one of {', '.join(VERIFY_BACKENDS)}")
    previous, _verify_backend = _verify_backend, name
    return previous


def verify_backend() -> str:
    return _verify_backend


def key_id_of_der(spki_der: bytes) -> str:
    return hashlib.sha256(spki_der).hexdigest()


@dataclass(frozen=True)
class PublicKey:
    """A verification key with its id. Immutable and cheap to share."""

    key_id: str
    der: bytes  # DER SubjectPublicKeyInfo
    _key: Ed25519PublicKey = field(repr=False, compare=False)
    raw: bytes = field(repr=False, compare=False)  # the 32-byte Ed25519 public key (what libsodium takes)

    @classmethod
    def from_crypto(cls, key: Ed25519PublicKey) -> "PublicKey":
        der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(key_id_of_der(der), der, key, raw)

    @classmethod
    def from_der(cls, der: bytes) -> "PublicKey":
        return cls._parsed(serialization.load_der_public_key, der, "DER SubjectPublicKeyInfo", "")

    @classmethod
    def from_pem(cls, pem: bytes | str, *, source: str = "PEM") -> "PublicKey":
        data = pem.encode() if isinstance(pem, str) else pem
        return cls._parsed(serialization.load_pem_public_key, data, "PEM public key", f"{source}: ")

    @classmethod
    def _parsed(cls, load: Any, data: bytes, what: str, prefix: str) -> "PublicKey":
        try:
            key = load(data)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{prefix}not a {what}: {exc}") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise KeyFileError(f"{prefix}expected an Ed25519 public key, got {type(key).__name__}")
        return cls.from_crypto(key)

    @classmethod
    def from_b64_der(cls, text: str) -> "PublicKey":
        try:
            der = base64.b64decode(text, validate=True)
        except ValueError as exc:
            raise KeyFileError(f"public key is not standard base64: {exc}") from exc
        return cls.from_der(der)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "PublicKey":
        """A public key file (PEM), or the public half of a private key file."""
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from exc
        if b"PRIVATE KEY" in data:
            return _load_private(data, str(path)).public
        return cls.from_pem(data, source=str(path))

    def __reduce__(self) -> tuple:
        # The cryptography key object does not pickle; the DER does (process pools).
        return (PublicKey.from_der, (self.der,))

    @property
    def b64_der(self) -> str:
        return base64.b64encode(self.der).decode("ascii")

    def pem(self) -> str:
        return self._key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def verify(self, signature: bytes, data: bytes) -> bool:
        """Whether ``signature`` is this key's Ed25519 signature over ``data`` (see `set_verify_backend`)."""
        # libsodium takes signature || message and splits at 64 bytes: a signature of
        # another length would shift that split, so it is refused here first.
        if len(signature) != SIGNATURE_SIZE:
            return False
        if _verify_backend == "sodium":
            try:
                crypto_sign_open(signature + data, self.raw)
            except BadSignatureError:
                return False
            return True
        try:
            self._key.verify(signature, data)
        except InvalidSignature:
            return False
        return True


class Signer:
    """An Ed25519 private key with its public half. ``sign`` is thread-safe."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self.public = PublicKey.from_crypto(private_key.public_key())

    @property
    def key_id(self) -> str:
        return self.public.key_id

    @classmethod
    def generate(cls) -> "Signer":
        return cls(Ed25519PrivateKey.generate())

    def sign(self, data: bytes) -> bytes:
        return self._private.sign(data)

    def private_pem(self) -> bytes:
        return self._private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def __repr__(self) -> str:
        return f"Signer(key_id={self.key_id[:16]}…)"


def _load_private(data: bytes, source: str) -> Signer:
    try:
        if data.lstrip().startswith(b"-----"):
            key = serialization.load_pem_private_key(data, password=None)
        else:
            key = serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise KeyFileError(f"{source}: not an unencrypted PKCS#8 private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{source}: expected an Ed25519 private key, got {type(key).__name__}")
    return Signer(key)


@dataclass(frozen=True)
class KeySource:
    """Where the signing key lives. Only ``state`` keys are created or replaced by us."""

    kind: Literal["state", "file", "credential"]
    path: Path

    def describe(self) -> str:
        return {"state": "managed key in the state directory", "file": "key file",
                "credential": "systemd credential"}[self.kind] + f" {self.path}"


def resolve_key_source(state_dir: str | os.PathLike[str], key_file: str | os.PathLike[str] | None = None,
                       env: Mapping[str, str] | None = None) -> KeySource:
    env = os.environ if env is None else env
    if key_file:
        return KeySource("file", Path(key_file))
    creds = env.get("CREDENTIALS_DIRECTORY")
    if creds and (Path(creds) / CREDENTIAL_NAME).is_file():
        return KeySource("credential", Path(creds) / CREDENTIAL_NAME)
    return KeySource("state", Path(state_dir) / STATE_KEY_PATH)


def read_private_key(path: str | os.PathLike[str], *, check_mode: bool = True) -> Signer:
    """Load a private key file, refusing one that others can read (like ssh does)."""
    path = Path(path)
    try:
        info = path.stat()
        data = path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from exc
    if check_mode and info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"key file {path} is accessible by group or others (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"run: chmod 600 {path}"
        )
    return _load_private(data, str(path))


def write_private_key(path: str | os.PathLike[str], signer: Signer) -> None:
    """Atomically write ``signer`` as PKCS#8 PEM, mode 0600, in a 0700 directory."""
    path = Path(path)
    ensure_private_dir(path.parent)
    atomic_write_bytes(path, signer.private_pem(), mode=0o600)


def _create_exclusive(path: Path, signer: Signer) -> None:
    """Write a new key at ``path`` unless one appears there first.

    Two processes starting at once must end up with the same key: the file
    is completed under a temporary name and hard-linked into place, which
    fails if the target exists (the loser then reads the winner's key).
    """
    ensure_private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(signer.private_pem())
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            pass
        fsync_dir(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def load_signer(source: KeySource, *, create: bool = True) -> Signer:
    """The signer at ``source``; a managed (state) key is generated on first use."""
    if source.kind == "state" and not source.path.exists():
        if not create:
            raise KeyFileError(f"no signing key yet at {source.path} (it is created on first use)")
        _create_exclusive(source.path, Signer.generate())
    # systemd hands credentials over as root-owned read-only files; their mode is systemd's business.
    return read_private_key(source.path, check_mode=source.kind != "credential")
