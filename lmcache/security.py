"""Access control helpers: the admin token of the HTTP face and the CurveZMQ keys of the ZMQ face.

Both are off unless configured. Keys are kept in zmq certificate files (the format
``zmq.auth.create_certificates`` writes), never in the configuration itself, so nothing that
prints a configuration can leak a secret key; the admin token is masked wherever a
configuration is shown.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.utils import z85

# Length of a z85-encoded 32-byte CURVE key.
Z85_KEY_CHARS = 40
MASK = "***"


class KeyFileError(ValueError):
    """A key file or key directory that cannot be used; the message says why, never a key."""


def mask_secret(value: str) -> str:
    """What a configuration shows for a secret: whether it is set, never its value."""
    return MASK if value else ""


def is_loopback(host: str) -> bool:
    """True for hosts only this machine can reach (localhost, 127.0.0.0/8, ::1)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name other than localhost, or a wildcard such as "*"
        return False


def bearer_matches(authorization: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``Bearer <token>``, compared in constant time."""
    if not authorization:
        return False
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer":
        return False
    # Bytes, because compare_digest refuses str with non-ASCII characters (a client may send any).
    return hmac.compare_digest(given.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8"))


def check_token(token: str) -> str | None:
    """Why ``token`` cannot be an admin token (it must fit in an HTTP header), or None if it can."""
    if token and not all(33 <= ord(c) <= 126 for c in token):
        return "must be printable ASCII without spaces"
    return None


def is_z85_key(key: bytes | str) -> bool:
    """Whether ``key`` is a z85-encoded 32-byte CURVE key."""
    try:
        raw = key.encode("ascii") if isinstance(key, str) else key
        return len(raw) == Z85_KEY_CHARS and len(z85.decode(raw)) == 32
    except (ValueError, KeyError, TypeError):  # z85.decode raises KeyError on a foreign character
        return False


def _load_certificate(path: str | os.PathLike[str]) -> tuple[bytes, bytes | None]:
    file = Path(path)
    if not file.is_file():
        raise KeyFileError(f"{file} is not a readable file")
    try:
        public, secret = zmq.auth.load_certificate(file)
    except PermissionError:
        raise KeyFileError(f"{file} is not readable (permission denied)") from None
    except (OSError, ValueError) as e:
        raise KeyFileError(f"{file} is not a zmq certificate ({e})") from None
    if not is_z85_key(public):
        raise KeyFileError(f"{file} holds a malformed public key")
    if secret is not None and not is_z85_key(secret):
        raise KeyFileError(f"{file} holds a malformed secret key")
    return public, secret


def load_keypair(path: str | os.PathLike[str]) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a secret certificate file (NAME.key_secret)."""
    public, secret = _load_certificate(path)
    if secret is None:
        raise KeyFileError(f"{path} holds no secret key (pass the .key_secret file, not the .key)")
    return public, secret


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """The z85 public key of a certificate file (either of the pair)."""
    return _load_certificate(path)[0]


def load_authorized_keys(directory: str | os.PathLike[str]) -> list[bytes]:
    """The public keys of every ``*.key`` file in ``directory`` (the files zmq's authenticator reads)."""
    folder = Path(directory)
    if not folder.is_dir():
        raise KeyFileError(f"{folder} is not a directory")
    try:
        files = sorted(folder.glob("*.key"))
    except PermissionError:
        raise KeyFileError(f"{folder} is not readable (permission denied)") from None
    if not files:
        # The authenticator reads the directory once, at start: an empty one would lock every client out.
        raise KeyFileError(f"{folder} holds no client public keys (*.key files, as `lmcache keygen` writes)")
    return [load_public_key(f) for f in files]


def server_public_key(value: str | bytes) -> bytes:
    """The server's z85 public key, given either as the key itself or as a path to its certificate."""
    if is_z85_key(value):
        return value.encode("ascii") if isinstance(value, str) else value
    path = os.fsdecode(value)
    if not Path(path).exists():
        raise KeyFileError(f"{path!r} is neither a 40-character z85 key nor an existing certificate file")
    return load_public_key(path)


def client_keypair(secret_file: str | os.PathLike[str] | None) -> tuple[bytes, bytes]:
    """The client's (public, secret) keys: from its certificate, or a fresh pair for this client only.

    A fresh pair encrypts the connection but identifies nobody, so a server that checks
    client keys (``--curve-authorized-keys``) will not let it in.
    """
    if secret_file:
        return load_keypair(secret_file)
    return zmq.curve_keypair()


def write_keypair(directory: str | os.PathLike[str], name: str) -> tuple[Path, Path]:
    """Writes NAME.key (public) and NAME.key_secret (owner-only) into ``directory``; never overwrites."""
    if not name or name in (".", "..") or "/" in name or os.sep in name:
        raise ValueError(f"must be a plain file name (got {name!r})")
    folder = Path(directory)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    for existing in (public, secret):
        if existing.exists():
            raise FileExistsError(f"{existing} already exists; remove it or pick another --name")
    folder.mkdir(parents=True, exist_ok=True)
    # Created under a private umask: the secret file is never readable by others, not even for a moment.
    old = os.umask(0o077)
    try:
        public_file, secret_file = zmq.auth.create_certificates(folder, name)
    finally:
        os.umask(old)
    os.chmod(public_file, 0o644)  # the public half is meant to be handed out
    return Path(public_file), Path(secret_file)
