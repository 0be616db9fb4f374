"""Authentication exchanges in both directions, as pure state machines.

Towards clients gpooler plays the server: it asks for SCRAM-SHA-256, md5 or a cleartext password
and checks the answer against the secret in the YAML. Towards Postgres it plays the client and
answers whatever the server asks for. No sockets here: the callers move the bytes.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os

from scramp import ScramClient, ScramException, ScramMechanism

from gpooler import protocol as p
from gpooler.config import password_kind

SCRAM = "SCRAM-SHA-256"
_MECHANISM = ScramMechanism(SCRAM)


class AuthFailed(Exception):
    """The client's answer did not prove it knows the password (28P01)."""


class AuthUnsupported(Exception):
    """The server asked for a method gpooler cannot answer."""


def md5_secret(password: str, user: str) -> str:
    """The `md5…` form Postgres stores: md5(password || user)."""
    return "md5" + hashlib.md5((password + user).encode()).hexdigest()


def md5_response(secret: str, salt: bytes) -> str:
    """Salt an `md5…` secret the way the md5 exchange expects."""
    return "md5" + hashlib.md5(secret[3:].encode() + salt).hexdigest()


@functools.lru_cache(maxsize=4096)
def scram_auth_info(secret: str) -> tuple[bytes, bytes, bytes, int]:
    """(salt, stored_key, server_key, iterations) for a plain password or a stored verifier.

    Cached because deriving from a plain password costs 4096 PBKDF2 rounds, and the YAML holds the
    same password for every login; the random salt is then fixed for the life of the process.
    """
    if password_kind(secret) == "scram":
        head, keys = secret[len(SCRAM) + 1 :].split("$", 1)
        iterations, salt = head.split(":", 1)
        stored_key, server_key = keys.split(":", 1)
        return (
            base64.b64decode(salt),
            base64.b64decode(stored_key),
            base64.b64decode(server_key),
            int(iterations),
        )
    salt, stored_key, server_key, iterations = _MECHANISM.make_auth_info(
        secret, iteration_count=4096
    )
    return salt, stored_key, server_key, iterations


# --------------------------------------------------------------------------- gpooler as the server


class ClientAuth:
    """One login's exchange: `first()` opens it, `step()` consumes each PasswordMessage body.

    `step` returns the bytes to send back and whether the client is now authenticated; a wrong
    answer raises AuthFailed, a malformed one ProtocolError.
    """

    def first(self) -> bytes:
        raise NotImplementedError

    def step(self, body: bytes) -> tuple[bytes, bool]:
        raise NotImplementedError


class ScramClientAuth(ClientAuth):
    """SCRAM-SHA-256 as Postgres speaks it (RFC 5802/7677, no channel binding yet).

    Written here rather than with scramp's server: Postgres clients send an empty SCRAM user name
    (`n=`), which the RFC allows and scramp refuses. scramp still derives the verifiers.
    """

    def __init__(self, secret: str) -> None:
        self._salt, self._stored_key, self._server_key, self._iterations = scram_auth_info(secret)
        self._stage = 0
        self._gs2_header = ""
        self._nonce = ""
        self._auth_prefix = ""

    def first(self) -> bytes:
        return p.auth_request(p.AUTH_SASL, p.cstr(SCRAM) + b"\0")

    def step(self, body: bytes) -> tuple[bytes, bool]:
        try:
            if self._stage == 0:
                return self._client_first(body), False
            return self._client_final(body), True
        except (ValueError, UnicodeDecodeError) as exc:
            raise p.ProtocolError(f"malformed SCRAM message: {exc}") from None

    def _client_first(self, body: bytes) -> bytes:
        mechanism, data = p.parse_sasl_initial(body)
        if mechanism != SCRAM:
            raise p.ProtocolError(f"unsupported SASL mechanism {mechanism}")
        message = data.decode("utf-8")
        flag, authzid, bare = message.split(",", 2)
        if flag not in ("n", "y") or authzid:
            raise ValueError("channel binding and authorization identities are not supported")
        attributes = _scram_attributes(bare)
        if "m" in attributes:
            raise ValueError("mandatory SCRAM extensions are not supported")
        client_nonce = attributes.get("r")
        if not client_nonce:
            raise ValueError("no client nonce")
        self._gs2_header = f"{flag},{authzid},"
        self._nonce = client_nonce + base64.b64encode(os.urandom(18)).decode()
        server_first = (
            f"r={self._nonce},s={base64.b64encode(self._salt).decode()},i={self._iterations}"
        )
        self._auth_prefix = f"{bare},{server_first},"
        self._stage = 1
        return p.auth_request(p.AUTH_SASL_CONTINUE, server_first.encode())

    def _client_final(self, body: bytes) -> bytes:
        message = body.decode("utf-8")
        without_proof, _, proof_attr = message.rpartition(",p=")
        attributes = _scram_attributes(without_proof)
        if attributes.get("c") != base64.b64encode(self._gs2_header.encode()).decode():
            raise ValueError("channel binding data does not match")
        if attributes.get("r") != self._nonce:
            raise ValueError("nonce does not match")
        proof = base64.b64decode(proof_attr, validate=True)
        auth_message = (self._auth_prefix + without_proof).encode()
        signature = hmac.digest(self._stored_key, auth_message, "sha256")
        if len(proof) != len(signature):
            raise AuthFailed("SCRAM proof has the wrong length")
        client_key = bytes(a ^ b for a, b in zip(proof, signature))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self._stored_key):
            raise AuthFailed("SCRAM proof does not match")
        verifier = hmac.digest(self._server_key, auth_message, "sha256")
        final = "v=" + base64.b64encode(verifier).decode()
        return p.auth_request(p.AUTH_SASL_FINAL, final.encode())


def _scram_attributes(text: str) -> dict[str, str]:
    attributes = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or len(name) != 1:
            raise ValueError(f"bad attribute {part[:20]!r}")
        attributes[name] = value
    return attributes


class Md5ClientAuth(ClientAuth):
    def __init__(self, secret: str, login: str) -> None:
        self._secret = secret if password_kind(secret) == "md5" else md5_secret(secret, login)
        self._salt = os.urandom(4)

    def first(self) -> bytes:
        return p.auth_request(p.AUTH_MD5, self._salt)

    def step(self, body: bytes) -> tuple[bytes, bool]:
        answer = p.parse_password_message(body)
        expected = md5_response(self._secret, self._salt).encode()
        if not hmac.compare_digest(answer, expected):
            raise AuthFailed("md5 password mismatch")
        return b"", True


class PlainClientAuth(ClientAuth):
    def __init__(self, secret: str) -> None:
        self._secret = secret

    def first(self) -> bytes:
        return p.auth_request(p.AUTH_CLEARTEXT)

    def step(self, body: bytes) -> tuple[bytes, bool]:
        answer = p.parse_password_message(body)
        if not hmac.compare_digest(answer, self._secret.encode()):
            raise AuthFailed("password mismatch")
        return b"", True


def client_auth(auth_type: str, secret: str, login: str) -> ClientAuth:
    """The exchange for a user's configured auth_type; login is the name the client sent."""
    if auth_type == "md5":
        return Md5ClientAuth(secret, login)
    if auth_type == "plain":
        return PlainClientAuth(secret)
    return ScramClientAuth(secret)


# --------------------------------------------------------------------------- gpooler as the client


class ServerAuth:
    """Answers a Postgres server's AuthenticationRequests for one server login."""

    def __init__(self, user: str, password: str | None) -> None:
        self._user = user
        self._password = password
        self._scram: ScramClient | None = None

    def respond(self, code: int, payload: bytes) -> bytes | None:
        """The message to send for one AuthenticationRequest, or None when none is due."""
        if code == p.AUTH_OK:
            return None
        if code in (p.AUTH_CLEARTEXT, p.AUTH_MD5, p.AUTH_SASL) and self._password is None:
            raise AuthUnsupported(
                f"server asks for a password for {self._user!r} and no server_password is set"
            )
        if code == p.AUTH_CLEARTEXT:
            return p.password_message(p.cstr(self._password))
        if code == p.AUTH_MD5:
            secret = (
                self._password
                if password_kind(self._password) == "md5"
                else md5_secret(self._password, self._user)
            )
            return p.password_message(p.cstr(md5_response(secret, payload[:4])))
        if code == p.AUTH_SASL:
            mechanisms = [m.decode() for m in payload.split(b"\0") if m]
            if SCRAM not in mechanisms:
                raise AuthUnsupported(f"server offers only {', '.join(mechanisms)}")
            self._scram = ScramClient([SCRAM], self._user, self._password)
            return p.sasl_initial_response(SCRAM, self._scram.get_client_first().encode())
        try:
            if code == p.AUTH_SASL_CONTINUE and self._scram is not None:
                self._scram.set_server_first(payload.decode())
                return p.password_message(self._scram.get_client_final().encode())
            if code == p.AUTH_SASL_FINAL and self._scram is not None:
                self._scram.set_server_final(payload.decode())
                return None
        except (ScramException, UnicodeDecodeError) as exc:
            raise AuthUnsupported(f"SCRAM exchange with the server failed: {exc}") from None
        raise AuthUnsupported(f"authentication request {code} is not supported")
