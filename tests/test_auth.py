"""Unit tests for gpooler.auth: both directions of authentication, no sockets and no Postgres.

Client side: gpooler's ScramClientAuth/Md5ClientAuth/PlainClientAuth are driven by scramp's
ScramClient or by a SCRAM/md5 client computed here by hand (RFC 5802/7677, the Postgres docs).
Server side: gpooler's ServerAuth answers AuthenticationRequests built by hand, checked against
scramp's ScramServer and hand-computed md5.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import struct

import pytest
from scramp import ScramClient, ScramException, ScramMechanism

from gpooler import auth
from gpooler import protocol as p

SCRAM = "SCRAM-SHA-256"


# ------------------------------------------------------------------------------------ helpers


def parse_auth_request(msg: bytes) -> tuple[int, bytes]:
    """Unframe an AuthenticationRequest ('R', Int32 length, Int32 code, payload) by hand."""
    assert msg[:1] == b"R"
    (length,) = struct.unpack_from("!I", msg, 1)
    assert length == len(msg) - 1
    (code,) = struct.unpack_from("!i", msg, 5)
    return code, msg[9:]


def parse_frontend(msg: bytes) -> tuple[bytes, bytes]:
    kind = msg[:1]
    (length,) = struct.unpack_from("!I", msg, 1)
    assert length == len(msg) - 1
    return kind, msg[5:]


def sasl_initial_body(mechanism: str, data: bytes) -> bytes:
    """SASLInitialResponse body: String mechanism, Int32 length of data, data."""
    return mechanism.encode() + b"\0" + struct.pack("!i", len(data)) + data


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def scram_keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes, bytes]:
    """(ClientKey, StoredKey, ServerKey) per RFC 5802 section 3, for an ASCII password."""
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    return client_key, stored_key, server_key


def attrs(text: str) -> dict[str, str]:
    out = {}
    for part in text.split(","):
        k, _, v = part.partition("=")
        out[k] = v
    return out


class HandScramClient:
    """A SCRAM-SHA-256 client computed with hashlib/hmac, sending what libpq sends."""

    def __init__(self, password: str, gs2: str = "n,,", user: str = "") -> None:
        self.password = password
        self.gs2 = gs2
        self.nonce = b64(os.urandom(18))
        self.first_bare = f"n={user},r={self.nonce}"

    def client_first(self) -> bytes:
        return (self.gs2 + self.first_bare).encode()

    def client_final(self, server_first: str) -> tuple[bytes, str]:
        """(client-final-message, expected server signature in base64)."""
        a = attrs(server_first)
        combined = a["r"]
        assert combined.startswith(self.nonce) and len(combined) > len(self.nonce)
        salt = base64.b64decode(a["s"])
        iterations = int(a["i"])
        client_key, stored_key, server_key = scram_keys(self.password, salt, iterations)
        without_proof = f"c={b64(self.gs2.encode())},r={combined}"
        auth_message = f"{self.first_bare},{server_first},{without_proof}".encode()
        signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
        proof = bytes(x ^ y for x, y in zip(client_key, signature))
        server_sig = hmac.new(server_key, auth_message, hashlib.sha256).digest()
        return f"{without_proof},p={b64(proof)}".encode(), b64(server_sig)


def run_scramp_client(server: auth.ClientAuth, user: str, password: str) -> None:
    """Drive a gpooler ScramClientAuth with scramp's ScramClient, end to end."""
    code, payload = parse_auth_request(server.first())
    assert code == 10  # AuthenticationSASL
    assert payload == b"SCRAM-SHA-256\0\0"  # mechanism list, then the empty terminator
    client = ScramClient([SCRAM], user, password)
    reply, done = server.step(sasl_initial_body(SCRAM, client.get_client_first().encode()))
    assert done is False
    code, payload = parse_auth_request(reply)
    assert code == 11  # AuthenticationSASLContinue
    client.set_server_first(payload.decode())
    reply, done = server.step(client.get_client_final().encode())
    assert done is True
    code, payload = parse_auth_request(reply)
    assert code == 12  # AuthenticationSASLFinal
    client.set_server_final(payload.decode())  # raises unless the server signature is right


def server_first_of(server: auth.ClientAuth, client_first: bytes) -> str:
    server.first()
    reply, done = server.step(sasl_initial_body(SCRAM, client_first))
    assert done is False
    code, payload = parse_auth_request(reply)
    assert code == 11
    return payload.decode()


def hand_verifier(password: str, salt: bytes, iterations: int = 4096) -> str:
    _, stored_key, server_key = scram_keys(password, salt, iterations)
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


# ------------------------------------------------------------------------------------ SCRAM: client side


def test_scram_with_scramp_client_right_password():
    run_scramp_client(auth.client_auth("scram-sha-256", "s3cret", "alice"), "alice", "s3cret")


def test_scram_with_scramp_client_wrong_password():
    with pytest.raises(auth.AuthFailed):
        run_scramp_client(auth.client_auth("scram-sha-256", "s3cret", "alice"), "alice", "nope")


def test_scram_is_the_default_exchange():
    assert isinstance(auth.client_auth("scram-sha-256", "x", "u"), auth.ScramClientAuth)
    assert isinstance(auth.client_auth("md5", "x", "u"), auth.Md5ClientAuth)
    assert isinstance(auth.client_auth("plain", "x", "u"), auth.PlainClientAuth)


def test_scram_empty_user_name_as_libpq_sends_it():
    server = auth.ScramClientAuth("pw with space")
    client = HandScramClient("pw with space")
    assert client.client_first().startswith(b"n,,n=,r=")
    server_first = server_first_of(server, client.client_first())
    a = attrs(server_first)
    assert list(a) == ["r", "s", "i"]
    assert a["r"].startswith(client.nonce) and len(a["r"]) > len(client.nonce)
    assert int(a["i"]) >= 4096
    assert len(base64.b64decode(a["s"])) >= 8
    final, expected_signature = client.client_final(server_first)
    reply, done = server.step(final)
    assert done is True
    code, payload = parse_auth_request(reply)
    assert code == 12
    assert payload.decode() == "v=" + expected_signature


def test_scram_y_flag_is_accepted_and_bound_into_c():
    # "y,,": the client supports channel binding but thinks the server does not.
    server = auth.ScramClientAuth("pw")
    client = HandScramClient("pw", gs2="y,,")
    final, expected_signature = client.client_final(server_first_of(server, client.client_first()))
    reply, done = server.step(final)
    assert done and parse_auth_request(reply) == (12, b"v=" + expected_signature.encode())


def test_scram_hand_client_wrong_password():
    server = auth.ScramClientAuth("right")
    client = HandScramClient("wrong")
    final, _ = client.client_final(server_first_of(server, client.client_first()))
    with pytest.raises(auth.AuthFailed):
        server.step(final)


def test_scram_stored_verifier():
    salt = os.urandom(16)
    verifier = hand_verifier("hunter2", salt, 4096)
    server = auth.client_auth("scram-sha-256", verifier, "bob")
    client = HandScramClient("hunter2")
    server_first = server_first_of(server, client.client_first())
    a = attrs(server_first)
    assert base64.b64decode(a["s"]) == salt
    assert a["i"] == "4096"
    final, expected_signature = client.client_final(server_first)
    reply, done = server.step(final)
    assert done and parse_auth_request(reply) == (12, b"v=" + expected_signature.encode())


def test_scram_stored_verifier_with_scramp_client_and_other_iterations():
    verifier = hand_verifier("hunter2", b"0123456789abcdef", 5000)
    run_scramp_client(auth.client_auth("scram-sha-256", verifier, "bob"), "bob", "hunter2")
    server = auth.client_auth("scram-sha-256", verifier, "bob")
    assert attrs(server_first_of(server, HandScramClient("x").client_first()))["i"] == "5000"
    with pytest.raises(auth.AuthFailed):
        run_scramp_client(auth.client_auth("scram-sha-256", verifier, "bob"), "bob", "hunter3")


def test_scram_each_login_gets_a_fresh_server_nonce():
    nonces = set()
    for _ in range(3):
        client = HandScramClient("pw")
        nonces.add(attrs(server_first_of(auth.ScramClientAuth("pw"), client.client_first()))["r"])
    assert len(nonces) == 3


def test_scram_replayed_final_for_another_nonce_fails():
    # A client-final proven for one server nonce must not pass on another login.
    first_server = auth.ScramClientAuth("pw")
    client = HandScramClient("pw")
    final, _ = client.client_final(server_first_of(first_server, client.client_first()))
    second_server = auth.ScramClientAuth("pw")
    server_first_of(second_server, client.client_first())
    with pytest.raises((p.ProtocolError, auth.AuthFailed)):
        second_server.step(final)


def test_scram_tampered_proof_fails():
    server = auth.ScramClientAuth("pw")
    client = HandScramClient("pw")
    final, _ = client.client_final(server_first_of(server, client.client_first()))
    head, _, proof = final.decode().rpartition(",p=")
    raw = bytearray(base64.b64decode(proof))
    raw[0] ^= 1
    with pytest.raises(auth.AuthFailed):
        server.step(f"{head},p={b64(bytes(raw))}".encode())


def test_scram_short_proof_fails():
    server = auth.ScramClientAuth("pw")
    client = HandScramClient("pw")
    final, _ = client.client_final(server_first_of(server, client.client_first()))
    head, _, _ = final.decode().rpartition(",p=")
    with pytest.raises(auth.AuthFailed):
        server.step(f"{head},p={b64(b'short')}".encode())


@pytest.mark.parametrize(
    "mutate",
    [
        lambda head, proof: f"c=eSws,{head.split(',', 1)[1]},p={proof}",  # "y,," binding, sent "n,,"
        lambda head, proof: f"{head}x,p={proof}",  # nonce altered
        lambda head, proof: f"{head},p=***",  # proof is not base64
        lambda head, proof: head,  # no proof at all
        lambda head, proof: "garbage",
    ],
)
def test_scram_malformed_final_is_a_protocol_error(mutate):
    server = auth.ScramClientAuth("pw")
    client = HandScramClient("pw")
    final, _ = client.client_final(server_first_of(server, client.client_first()))
    head, _, proof = final.decode().rpartition(",p=")
    with pytest.raises(p.ProtocolError):
        server.step(mutate(head, proof).encode())


@pytest.mark.parametrize(
    "body",
    [
        sasl_initial_body("SCRAM-SHA-256-PLUS", b"p=tls-server-end-point,,n=,r=abc"),
        sasl_initial_body("PLAIN", b"\0user\0pw"),
        sasl_initial_body(SCRAM, b"p=tls-server-end-point,,n=,r=abc"),  # channel binding
        sasl_initial_body(SCRAM, b"n,a=admin,n=,r=abc"),  # authzid
        sasl_initial_body(SCRAM, b"n,,n="),  # no nonce
        sasl_initial_body(SCRAM, b"n,,n=,r="),  # empty nonce
        sasl_initial_body(SCRAM, b"n,,"),
        sasl_initial_body(SCRAM, b"x,,n=,r=abc"),
        sasl_initial_body(SCRAM, b"n,,n=,r=\xff"),  # not UTF-8
        b"SCRAM-SHA-256\0" + struct.pack("!i", 100) + b"n,,n=,r=abc",  # wrong length
        b"SCRAM-SHA-256",
    ],
)
def test_scram_malformed_first_is_a_protocol_error(body):
    server = auth.ScramClientAuth("pw")
    server.first()
    with pytest.raises(p.ProtocolError):
        server.step(body)


def test_scram_auth_info_parses_a_verifier():
    verifier = hand_verifier("pw", b"saltsaltsalt", 4096)
    salt, stored, server_key, iterations = auth.scram_auth_info(verifier)
    _, want_stored, want_server = scram_keys("pw", b"saltsaltsalt", 4096)
    assert (salt, stored, server_key, iterations) == (
        b"saltsaltsalt",
        want_stored,
        want_server,
        4096,
    )


def test_scram_auth_info_from_plain_password_is_a_valid_verifier():
    salt, stored, server_key, iterations = auth.scram_auth_info("plain pw")
    _, want_stored, want_server = scram_keys("plain pw", salt, iterations)
    assert (stored, server_key) == (want_stored, want_server)
    assert iterations == 4096


# ------------------------------------------------------------------------------------ md5 / plain


def md5_client_answer(password: str, user: str, salt: bytes) -> bytes:
    """What libpq sends for AuthenticationMD5Password: "md5" md5(md5(password user) salt)."""
    inner = hashlib.md5(password.encode() + user.encode()).hexdigest()
    return b"md5" + hashlib.md5(inner.encode() + salt).hexdigest().encode()


def md5_salt(server: auth.ClientAuth) -> bytes:
    code, payload = parse_auth_request(server.first())
    assert code == 5  # AuthenticationMD5Password
    assert len(payload) == 4
    return payload


@pytest.mark.parametrize("stored", ["plain", "md5"])
def test_md5_right_password(stored):
    secret = "pässword"
    if stored == "md5":
        secret = "md5" + hashlib.md5("pässword".encode() + b"carol").hexdigest()
    server = auth.client_auth("md5", secret, "carol")
    salt = md5_salt(server)
    reply, done = server.step(md5_client_answer("pässword", "carol", salt) + b"\0")
    assert (reply, done) == (b"", True)


@pytest.mark.parametrize("stored", ["plain", "md5"])
def test_md5_wrong_password_or_user(stored):
    secret = "pw"
    if stored == "md5":
        secret = "md5" + hashlib.md5(b"pwcarol").hexdigest()
    for password, user in [("pW", "carol"), ("pw", "dave")]:
        server = auth.client_auth("md5", secret, "carol")
        salt = md5_salt(server)
        with pytest.raises(auth.AuthFailed):
            server.step(md5_client_answer(password, user, salt) + b"\0")


def test_md5_salt_is_random_per_login():
    salts = {md5_salt(auth.client_auth("md5", "pw", "u")) for _ in range(4)}
    assert len(salts) > 1


def test_md5_answer_for_another_salt_fails():
    server = auth.client_auth("md5", "pw", "u")
    salt = md5_salt(server)
    other = bytes([salt[0] ^ 0xFF]) + salt[1:]
    with pytest.raises(auth.AuthFailed):
        server.step(md5_client_answer("pw", "u", other) + b"\0")


def test_md5_unterminated_answer_is_a_protocol_error():
    server = auth.client_auth("md5", "pw", "u")
    salt = md5_salt(server)
    with pytest.raises(p.ProtocolError):
        server.step(md5_client_answer("pw", "u", salt))


def test_plain_password():
    server = auth.client_auth("plain", "open sesame", "u")
    assert parse_auth_request(server.first()) == (3, b"")  # AuthenticationCleartextPassword
    assert server.step(b"open sesame\0") == (b"", True)
    for wrong in (b"open sesame \0", b"\0", b"open\0"):
        with pytest.raises(auth.AuthFailed):
            auth.client_auth("plain", "open sesame", "u").step(wrong)
    with pytest.raises(p.ProtocolError):
        auth.client_auth("plain", "open sesame", "u").step(b"open sesame")


def test_md5_helpers_match_the_docs():
    assert auth.md5_secret("pw", "user") == "md5" + hashlib.md5(b"pwuser").hexdigest()
    secret = "md5" + hashlib.md5(b"pwuser").hexdigest()
    assert auth.md5_response(secret, b"\1\2\3\4").encode() == md5_client_answer(
        "pw", "user", b"\1\2\3\4"
    )


# ------------------------------------------------------------------------------------ ServerAuth


def test_server_auth_ok_needs_no_answer():
    assert auth.ServerAuth("u", None).respond(0, b"") is None
    assert auth.ServerAuth("u", "pw").respond(0, b"") is None


def test_server_auth_cleartext():
    msg = auth.ServerAuth("u", "pa ss").respond(3, b"")
    assert parse_frontend(msg) == (b"p", b"pa ss\0")


@pytest.mark.parametrize("stored", ["plain", "md5"])
def test_server_auth_md5(stored):
    password = "pw" if stored == "plain" else "md5" + hashlib.md5(b"pwsvc").hexdigest()
    salt = b"\x01\xfe\x00\x7f"
    msg = auth.ServerAuth("svc", password).respond(5, salt)
    kind, body = parse_frontend(msg)
    assert kind == b"p"
    assert body == md5_client_answer("pw", "svc", salt) + b"\0"


def test_server_auth_scram_against_scramp_server():
    mechanism = ScramMechanism()
    auth_info = mechanism.make_auth_info("srv pw", iteration_count=4096)
    seen_users = []

    def auth_fn(username):
        seen_users.append(username)
        return auth_info

    server = mechanism.make_server(auth_fn)
    client = auth.ServerAuth("svc", "srv pw")

    # AuthenticationSASL lists mechanisms, -PLUS first as Postgres does with TLS, then a terminator.
    msg = client.respond(10, b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0")
    kind, body = parse_frontend(msg)
    assert kind == b"p"
    mech_end = body.index(b"\0")
    assert body[:mech_end] == b"SCRAM-SHA-256"
    (length,) = struct.unpack_from("!i", body, mech_end + 1)
    client_first = body[mech_end + 5 :]
    assert length == len(client_first)
    assert client_first.startswith(b"n,,")  # no channel binding offered

    server.set_client_first(client_first.decode())
    msg = client.respond(11, server.get_server_first().encode())
    kind, client_final = parse_frontend(msg)
    assert kind == b"p"
    server.set_client_final(client_final.decode())  # raises if the proof is wrong
    assert client.respond(12, server.get_server_final().encode()) is None
    assert seen_users == ["svc"]


def scramp_server_until_final(client: auth.ServerAuth, auth_info: tuple):
    """Drive ServerAuth against scramp's server up to the client's final message: (server, it)."""
    server = ScramMechanism().make_server(lambda username: auth_info)
    _, body = parse_frontend(client.respond(10, b"SCRAM-SHA-256\0\0"))
    server.set_client_first(body[body.index(b"\0") + 5 :].decode())
    _, client_final = parse_frontend(client.respond(11, server.get_server_first().encode()))
    return server, client_final.decode()


def test_server_auth_scram_wrong_password_is_refused_by_scramp():
    auth_info = ScramMechanism().make_auth_info("right", iteration_count=4096)
    server, client_final = scramp_server_until_final(auth.ServerAuth("svc", "wrong"), auth_info)
    with pytest.raises(ScramException):
        server.set_client_final(client_final)


def test_server_auth_scram_rejects_a_forged_server_signature():
    auth_info = ScramMechanism().make_auth_info("pw", iteration_count=4096)
    client = auth.ServerAuth("svc", "pw")
    server, client_final = scramp_server_until_final(client, auth_info)
    server.set_client_final(client_final)
    forged = "v=" + b64(b"\0" * 32)
    with pytest.raises(Exception):
        client.respond(12, forged.encode())


@pytest.mark.parametrize("code", [3, 5, 10])
def test_server_auth_without_password_is_unsupported(code):
    payload = {3: b"", 5: b"salt", 10: b"SCRAM-SHA-256\0\0"}[code]
    with pytest.raises(auth.AuthUnsupported):
        auth.ServerAuth("u", None).respond(code, payload)


@pytest.mark.parametrize(
    "code, payload",
    [
        (2, b""),  # KerberosV5
        (7, b""),  # GSS
        (8, b"token"),  # GSSContinue
        (9, b""),  # SSPI
        (99, b""),
        (11, b"r=abc,s=c2FsdA==,i=4096"),  # SASLContinue with no SASL exchange begun
        (12, b"v=abc"),  # SASLFinal with no SASL exchange begun
    ],
)
def test_server_auth_unknown_method_is_unsupported(code, payload):
    with pytest.raises(auth.AuthUnsupported):
        auth.ServerAuth("u", "pw").respond(code, payload)


def test_server_auth_sasl_without_scram_is_unsupported():
    with pytest.raises(auth.AuthUnsupported):
        auth.ServerAuth("u", "pw").respond(10, b"SCRAM-SHA-256-PLUS\0OAUTHBEARER\0\0")


# ------------------------------------------------------------------------------------ SCRAM pass-through


def verifier_of(auth_info: tuple) -> str:
    salt, stored_key, server_key, iterations = auth_info
    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def keys_from_login(auth_info: tuple, password: str) -> auth.ScramKeys:
    """What gpooler recovers when a client logs in with password against the verifier."""
    exchange = auth.ScramClientAuth(verifier_of(auth_info))
    run_scramp_client(exchange, "client", password)
    return exchange.upstream


def test_scram_login_recovers_the_client_key():
    auth_info = ScramMechanism().make_auth_info("role pw", iteration_count=4096)
    keys = keys_from_login(auth_info, "role pw")
    client_key, _, server_key = scram_keys("role pw", auth_info[0], 4096)
    assert keys == auth.ScramKeys(client_key, server_key, auth_info[0], 4096)
    assert keys == auth.scram_keys("role pw", auth_info[0], 4096)
    assert b64(client_key) not in repr(keys) and client_key.hex() not in repr(keys)


def test_pass_through_logs_in_to_a_scramp_server_with_the_same_verifier():
    auth_info = ScramMechanism().make_auth_info("role pw", iteration_count=8192)
    client = auth.ServerAuth("role", keys_from_login(auth_info, "role pw"))
    server, client_final = scramp_server_until_final(client, auth_info)
    assert client_final.startswith("c=biws,r=")  # no channel binding, as the first said
    server.set_client_final(client_final)  # raises unless the proof is right
    assert client.respond(12, server.get_server_final().encode()) is None


def test_pass_through_keys_of_another_password_are_refused_by_scramp():
    auth_info = ScramMechanism().make_auth_info("role pw", iteration_count=4096)
    wrong = auth.scram_keys("other pw", auth_info[0], 4096)
    server, client_final = scramp_server_until_final(auth.ServerAuth("role", wrong), auth_info)
    with pytest.raises(ScramException):
        server.set_client_final(client_final)


def test_pass_through_stops_when_the_verifier_changed():
    keys = keys_from_login(ScramMechanism().make_auth_info("old", iteration_count=4096), "old")
    changed = ScramMechanism().make_auth_info("new", iteration_count=4096)  # another salt
    with pytest.raises(auth.AuthUnsupported, match="password changed"):
        scramp_server_until_final(auth.ServerAuth("role", keys), changed)


def test_pass_through_checks_the_server_signature_and_nonce():
    auth_info = ScramMechanism().make_auth_info("pw", iteration_count=4096)
    keys = keys_from_login(auth_info, "pw")
    client = auth.ServerAuth("role", keys)
    server, client_final = scramp_server_until_final(client, auth_info)
    server.set_client_final(client_final)
    with pytest.raises(auth.AuthUnsupported, match="signature"):
        client.respond(12, ("v=" + b64(b"\0" * 32)).encode())
    client = auth.ServerAuth("role", keys)
    client.respond(10, b"SCRAM-SHA-256\0\0")
    with pytest.raises(auth.AuthUnsupported, match="nonce"):
        client.respond(11, f"r=someone-elses,s={b64(auth_info[0])},i=4096".encode())


@pytest.mark.parametrize("code", [3, 5])
def test_pass_through_cannot_answer_cleartext_or_md5(code):
    keys = auth.scram_keys("pw", b"salt", 4096)
    with pytest.raises(auth.AuthUnsupported, match="scram-sha-256"):
        auth.ServerAuth("role", keys).respond(code, b"salt")


def test_scram_keys_prepare_the_password_as_postgres_does():
    salt = os.urandom(16)
    password = "I\u00adX \u2168"  # a soft hyphen (dropped) and a Roman numeral (NFKC: IX)
    _, stored_key, server_key, _ = ScramMechanism().make_auth_info(password, 4096, salt)
    keys = auth.scram_keys(password, salt, 4096)
    assert hashlib.sha256(keys.client_key).digest() == stored_key
    assert keys.server_key == server_key


# ------------------------------------------------------------------------------------ auth_query secrets


def test_check_password_against_each_kind_of_secret():
    verifier = hand_verifier("pw", b"0123456789abcdef")
    assert auth.check_password(verifier, "pw", "role") == auth.scram_keys(
        "pw", b"0123456789abcdef", 4096)
    md5 = auth.md5_secret("pw", "role")
    assert auth.check_password(md5, "pw", "role") == md5
    assert auth.check_password("pw", "pw", "role") == "pw"
    for secret in (verifier, md5, "pw"):
        with pytest.raises(auth.AuthFailed):
            auth.check_password(secret, "wrong", "role")
    with pytest.raises(auth.AuthFailed):
        auth.check_password(md5, "pw", "role.acme")  # the hash is salted with the role name


def test_cleartext_login_against_a_verifier_gives_keys_and_can_be_checked_again():
    old, new = hand_verifier("old", b"salt-old"), hand_verifier("new", b"salt-new")
    exchange = auth.PlainClientAuth(old, "role")
    assert parse_auth_request(exchange.first()) == (3, b"")
    with pytest.raises(auth.AuthFailed):
        exchange.step(b"new\0")
    assert exchange.recheck(new) is True
    assert exchange.upstream == auth.scram_keys("new", b"salt-new", 4096)
    assert exchange.recheck(old) is False


def test_md5_answer_is_checked_again_against_a_new_hash():
    old, new = auth.md5_secret("old", "role"), auth.md5_secret("new", "role")
    exchange = auth.Md5ClientAuth(old, "role")
    salt = md5_salt(exchange)
    with pytest.raises(auth.AuthFailed):
        exchange.step(md5_client_answer("new", "role", salt) + b"\0")
    assert exchange.recheck(hand_verifier("new", b"s")) is False  # not md5: cannot be
    assert exchange.recheck(new) is True
    assert exchange.upstream == new


def test_scram_answer_cannot_be_checked_again():
    exchange = auth.ScramClientAuth(hand_verifier("old", b"salt"))
    assert exchange.recheck(hand_verifier("new", b"salt")) is False


def test_mock_verifier_is_stable_per_name_and_matches_nothing():
    seed = os.urandom(32)
    verifier = auth.mock_verifier(seed, "acme/ghost")
    assert verifier == auth.mock_verifier(seed, "acme/ghost")
    assert verifier != auth.mock_verifier(seed, "acme/other")
    assert verifier != auth.mock_verifier(os.urandom(32), "acme/ghost")
    salt, _, _, iterations = auth.scram_auth_info(verifier)
    assert (len(salt), iterations) == (16, 4096)
    for password in ("", "ghost", "pw"):
        with pytest.raises(auth.AuthFailed):
            run_scramp_client(auth.ScramClientAuth(verifier), "ghost", password)
