"""Authentication exchanges in both directions, as pure state machines.

Towards clients gpooler plays the server: it asks for SCRAM-SHA-256, md5 or a cleartext password
and checks the answer against the secret in the YAML (or the one auth_query found). Towards
Postgres it plays the client and answers whatever the server asks for, with a password or with
what a client's login proved: the SCRAM keys recovered from its proof (pass-through), or the md5
hash it answered for. No sockets here: the callers move the bytes.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import os
from dataclasses import dataclass, field

from scramp import ScramClient, ScramException, ScramMechanism
from scramp.utils import saslprep

from gpooler import protocol as p
from gpooler.config import password_kind

SCRAM = "SCRAM-SHA-256"
_MECHANISM = ScramMechanism(SCRAM)


class AuthFailed(Exception):
    """The client's answer did not prove it knows the password (28P01)."""


class AuthUnsupported(Exception):
    """The server asked for a method gpooler cannot answer."""


@dataclass(frozen=True)
class ScramKeys:
    """What a client's SCRAM login proved: its ClientKey (the proof XOR the client signature) and
    the verifier's ServerKey, salt and iterations.

    Enough to log in to Postgres as the same role for as long as its verifier stays the same, and
    not the password. Kept in memory only; the repr shows no key.
    """

    client_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)
    salt: bytes = field(repr=False)
    iterations: int


# What gpooler gives Postgres: a plain password or an md5 hash (the YAML's server_password, or the
# hash a client answered md5 for), SCRAM keys from a client's login, or nothing (trust).
Credential = str | ScramKeys | None


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


def scram_keys(password: str, salt: bytes, iterations: int) -> ScramKeys:
    """The keys a password gives for a verifier's salt and iterations (RFC 5802, section 3).

    The password is SASLprep-normalised first, or taken as it is when it cannot be: what Postgres
    does when it makes a verifier.
    """
    try:
        password = saslprep(password)
    except ScramException:
        pass
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    return ScramKeys(
        hmac.digest(salted, b"Client Key", "sha256"),
        hmac.digest(salted, b"Server Key", "sha256"),
        salt,
        iterations,
    )


def mock_verifier(seed: bytes, name: str) -> str:
    """A SCRAM verifier that no password matches, the same at every attempt for one name.

    Used for a role auth_query does not know (or whose password is unset or expired): the client
    goes through the same exchange, with a salt as stable as a real one, and is told what a wrong
    password is told. Postgres does the same for unknown roles.
    """
    salt = hmac.digest(seed, b"salt\0" + name.encode(), "sha256")[:16]
    keys = hmac.digest(seed, b"keys\0" + name.encode(), "sha256")
    return f"{SCRAM}$4096:{_b64(salt)}${_b64(keys)}:{_b64(keys)}"


def check_password(secret: str, password: str, role: str) -> Credential:
    """Whether a cleartext password matches a secret; when it does, what logs in to Postgres as
    `role` without keeping the password: the md5 hash, the SCRAM keys, or a plain secret itself.
    Raises AuthFailed when it does not match."""
    kind = password_kind(secret)
    if kind == "scram":
        salt, stored_key, _, iterations = scram_auth_info(secret)
        keys = scram_keys(password, salt, iterations)
        if hmac.compare_digest(hashlib.sha256(keys.client_key).digest(), stored_key):
            return keys
    elif kind == "md5":
        if hmac.compare_digest(md5_secret(password, role).encode(), secret.encode()):
            return secret
    elif hmac.compare_digest(password.encode(), secret.encode()):
        return secret
    raise AuthFailed("password mismatch")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# --------------------------------------------------------------------------- gpooler as the server


class ClientAuth:
    """One login's exchange: `first()` opens it, `step()` consumes each PasswordMessage body.

    `step` returns the bytes to send back and whether the client is now authenticated; a wrong
    answer raises AuthFailed, a malformed one ProtocolError. After success, `upstream` is what the
    client proved, in the form that logs in to Postgres as the same role.
    """

    upstream: Credential = None

    def first(self) -> bytes:
        raise NotImplementedError

    def step(self, body: bytes) -> tuple[bytes, bool]:
        raise NotImplementedError

    def recheck(self, secret: str) -> bool:
        """After a failure: whether the answer just refused matches a newer secret (auth_query
        fetched one). Only answers that do not depend on the secret's salt can be checked again:
        md5 (salted with the role name) and cleartext; a SCRAM proof is bound to the old salt."""
        return False


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
        self._nonce = client_nonce + _b64(os.urandom(18))
        server_first = f"r={self._nonce},s={_b64(self._salt)},i={self._iterations}"
        self._auth_prefix = f"{bare},{server_first},"
        self._stage = 1
        return p.auth_request(p.AUTH_SASL_CONTINUE, server_first.encode())

    def _client_final(self, body: bytes) -> bytes:
        message = body.decode("utf-8")
        without_proof, _, proof_attr = message.rpartition(",p=")
        attributes = _scram_attributes(without_proof)
        if attributes.get("c") != _b64(self._gs2_header.encode()):
            raise ValueError("channel binding data does not match")
        if attributes.get("r") != self._nonce:
            raise ValueError("nonce does not match")
        proof = base64.b64decode(proof_attr, validate=True)
        auth_message = (self._auth_prefix + without_proof).encode()
        signature = hmac.digest(self._stored_key, auth_message, "sha256")
        if len(proof) != len(signature):
            raise AuthFailed("SCRAM proof has the wrong length")
        client_key = _xor(proof, signature)
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self._stored_key):
            raise AuthFailed("SCRAM proof does not match")
        self.upstream = ScramKeys(client_key, self._server_key, self._salt, self._iterations)
        verifier = hmac.digest(self._server_key, auth_message, "sha256")
        return p.auth_request(p.AUTH_SASL_FINAL, f"v={_b64(verifier)}".encode())


def _scram_attributes(text: str) -> dict[str, str]:
    attributes = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or len(name) != 1:
            raise ValueError(f"bad attribute {part[:20]!r}")
        attributes[name] = value
    return attributes


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


class Md5ClientAuth(ClientAuth):
    """md5: the client answers md5(md5(password + login name) + salt), so a stored hash only
    matches when it was made with the very name the client logs in with."""

    def __init__(self, secret: str, login: str) -> None:
        self._secret = secret if password_kind(secret) == "md5" else md5_secret(secret, login)
        self._salt = os.urandom(4)
        self._answer = b""

    def first(self) -> bytes:
        return p.auth_request(p.AUTH_MD5, self._salt)

    def step(self, body: bytes) -> tuple[bytes, bool]:
        self._answer = p.parse_password_message(body)
        if not self._matches(self._secret):
            raise AuthFailed("md5 password mismatch")
        self.upstream = self._secret
        return b"", True

    def recheck(self, secret: str) -> bool:
        if password_kind(secret) != "md5" or not self._matches(secret):
            return False
        self._secret = self.upstream = secret
        return True

    def _matches(self, secret: str) -> bool:
        expected = md5_response(secret, self._salt).encode()
        return hmac.compare_digest(self._answer, expected)


class PlainClientAuth(ClientAuth):
    """Cleartext: the password itself, checked against a plain password, an md5 hash made with
    `role` or a SCRAM verifier."""

    def __init__(self, secret: str, role: str) -> None:
        self._secret = secret
        self._role = role
        self._answer = ""

    def first(self) -> bytes:
        return p.auth_request(p.AUTH_CLEARTEXT)

    def step(self, body: bytes) -> tuple[bytes, bool]:
        try:
            self._answer = p.parse_password_message(body).decode("utf-8")
        except UnicodeDecodeError:
            raise AuthFailed("password is not UTF-8") from None
        self.upstream = check_password(self._secret, self._answer, self._role)
        return b"", True

    def recheck(self, secret: str) -> bool:
        try:
            self.upstream = check_password(secret, self._answer, self._role)
        except AuthFailed:
            return False
        return True


def client_auth(auth_type: str, secret: str, login: str) -> ClientAuth:
    """The exchange for a user's configured auth_type; login is the name the client sent."""
    if auth_type == "md5":
        return Md5ClientAuth(secret, login)
    if auth_type == "plain":
        return PlainClientAuth(secret, login)
    return ScramClientAuth(secret)


# --------------------------------------------------------------------------- gpooler as the client


class ScramPassThrough:
    """The client side of SCRAM-SHA-256 from a client's recovered keys instead of a password.

    Postgres checks the proof against the role's verifier, which is the one the client's proof was
    checked against, so the same ClientKey answers it: ClientProof = ClientKey XOR
    HMAC(H(ClientKey), AuthMessage). The server's signature is checked with the ServerKey. Method
    names follow scramp's ScramClient, so ServerAuth drives either.
    """

    def __init__(self, user: str, keys: ScramKeys) -> None:
        self._keys = keys
        self._nonce = _b64(os.urandom(18))
        # Postgres ignores the SCRAM user name; it is sent as scramp sends it for passwords.
        name = user.replace("=", "=3D").replace(",", "=2C")
        self._first_bare = f"n={name},r={self._nonce}"
        self._server_first = ""
        self._signature = b""

    def get_client_first(self) -> str:
        return "n,," + self._first_bare

    def set_server_first(self, message: str) -> None:
        attributes = _scram_attributes(message)
        nonce = attributes.get("r", "")
        if not nonce.startswith(self._nonce) or len(nonce) == len(self._nonce):
            raise ValueError("the server's nonce does not extend gpooler's")
        salt, iterations = base64.b64decode(attributes.get("s", "")), int(attributes.get("i", "0"))
        if (salt, iterations) != (self._keys.salt, self._keys.iterations):
            raise ValueError("the role's SCRAM verifier is not the one the client's login was "
                             "checked against (its password changed since)")
        self._server_first = message

    def get_client_final(self) -> str:
        nonce = _scram_attributes(self._server_first)["r"]
        without_proof = f"c=biws,r={nonce}"
        auth_message = f"{self._first_bare},{self._server_first},{without_proof}".encode()
        client_key = self._keys.client_key
        stored_key = hashlib.sha256(client_key).digest()
        proof = _xor(client_key, hmac.digest(stored_key, auth_message, "sha256"))
        self._signature = hmac.digest(self._keys.server_key, auth_message, "sha256")
        return f"{without_proof},p={_b64(proof)}"

    def set_server_final(self, message: str) -> None:
        attributes = _scram_attributes(message)
        if "e" in attributes:
            raise ValueError(f"server error {attributes['e']}")
        signature = base64.b64decode(attributes.get("v", ""))
        if not self._signature or not hmac.compare_digest(signature, self._signature):
            raise ValueError("the server's signature does not match")


class ServerAuth:
    """Answers a Postgres server's AuthenticationRequests for one server login."""

    def __init__(self, user: str, credential: Credential) -> None:
        self._user = user
        self._credential = credential
        self._scram: ScramClient | ScramPassThrough | None = None

    def respond(self, code: int, payload: bytes) -> bytes | None:
        """The message to send for one AuthenticationRequest, or None when none is due."""
        if code == p.AUTH_OK:
            return None
        credential = self._credential
        if code in (p.AUTH_CLEARTEXT, p.AUTH_MD5, p.AUTH_SASL) and credential is None:
            raise AuthUnsupported(
                f"server asks for a password for {self._user!r} and no server_password is set"
            )
        if code in (p.AUTH_CLEARTEXT, p.AUTH_MD5) and isinstance(credential, ScramKeys):
            method = "a cleartext" if code == p.AUTH_CLEARTEXT else "an md5"
            raise AuthUnsupported(
                f"server asks for {method} password for {self._user!r}, and gpooler holds only "
                "the SCRAM keys of the client's login: let pg_hba.conf ask for scram-sha-256"
            )
        if code == p.AUTH_CLEARTEXT:
            return p.password_message(p.cstr(credential))
        if code == p.AUTH_MD5:
            secret = (
                credential if password_kind(credential) == "md5"
                else md5_secret(credential, self._user)
            )
            return p.password_message(p.cstr(md5_response(secret, payload[:4])))
        if code == p.AUTH_SASL:
            mechanisms = [m.decode() for m in payload.split(b"\0") if m]
            if SCRAM not in mechanisms:
                raise AuthUnsupported(f"server offers only {', '.join(mechanisms)}")
            if isinstance(credential, ScramKeys):
                self._scram = ScramPassThrough(self._user, credential)
            else:
                self._scram = ScramClient([SCRAM], self._user, credential)
            return p.sasl_initial_response(SCRAM, self._scram.get_client_first().encode())
        try:
            if code == p.AUTH_SASL_CONTINUE and self._scram is not None:
                self._scram.set_server_first(payload.decode())
                return p.password_message(self._scram.get_client_final().encode())
            if code == p.AUTH_SASL_FINAL and self._scram is not None:
                self._scram.set_server_final(payload.decode())
                return None
        except (ScramException, ValueError) as exc:
            raise AuthUnsupported(f"SCRAM exchange with the server failed: {exc}") from None
        raise AuthUnsupported(f"authentication request {code} is not supported")
