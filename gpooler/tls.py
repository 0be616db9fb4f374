"""TLS towards clients and towards Postgres.

Clients: with `tls:` configured an SSLRequest is answered "S" and the handshake done before the
startup packet is read; a client may also open with a TLS ClientHello at once (PostgreSQL 17's
`sslnegotiation=direct`, which must then negotiate ALPN "postgresql"). The SNI name the client
sent is kept on its socket for tenant resolution, and a tenant with `enforce_ssl` refuses clients
that came without TLS. The certificate is loaded again on every SIGHUP; a broken one is logged and
the previous one kept.

Postgres: each tenant's `server_tls` decides whether a new server connection sends an SSLRequest
and what it checks: disable (never), prefer (TLS when offered, plain otherwise, nothing verified),
require (TLS or fail, nothing verified), verify-ca (the certificate must chain to
`server_tls_ca_file`, or the system's CAs), verify-full (verify-ca and the host name too).

The gevent ssl module is used explicitly so that handshakes and reads yield to other greenlets
whether or not the standard library was monkey-patched.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from gevent import ssl

from gpooler import protocol as p
from gpooler.login import Refusal
from gpooler.sockets import ClientGone

if TYPE_CHECKING:
    from gpooler.config import Config, TenantConfig, TlsConfig

log = logging.getLogger(__name__)

ALPN = "postgresql"
_TLS_HANDSHAKE_RECORD = b"\x16"  # the first byte of a ClientHello; a packet length starts with 0
_SSL_REQUEST = struct.pack("!II", 8, p.SSL_REQUEST)


class TlsError(OSError):
    """A certificate, key or CA file cannot be used, or a server's TLS is not what its mode wants;
    an OSError so that callers treating connection failures already handle it."""


# ------------------------------------------------------------------------------- towards clients


class ClientTlsSocket(ssl.SSLSocket):
    """A client connection inside TLS, with the SNI host name the client sent (if any).

    Closing it says close_notify first, as Postgres does: libpq 17 reports a TLS connection that
    ends without one as an error ("unexpected eof"), which fails a cancel request that worked.
    """

    sni_host: str | None = None
    established = False  # the handshake succeeded: there is a session to close

    def _close_notify(self) -> None:
        sslobj = self._sslobj
        if self.established and sslobj is not None:
            self.established = False
            try:
                # Sends close_notify; the socket is non-blocking underneath, so waiting for the
                # peer's answer raises SSLWantReadError at once instead of blocking.
                sslobj.shutdown()
            except OSError:
                pass

    def shutdown(self, how: int) -> None:
        self._close_notify()
        super().shutdown(how)

    def close(self) -> None:
        self._close_notify()
        super().close()


class _ClientContext(ssl.SSLContext):
    sslsocket_class = ClientTlsSocket


def _remember_sni(sock: ClientTlsSocket, server_name: str | None, context: ssl.SSLContext) -> None:
    sock.sni_host = server_name.lower() if server_name else None


def client_context(config: "TlsConfig") -> ssl.SSLContext:
    """The server-side context for client connections; raises TlsError naming the bad file."""
    context = _ClientContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION  # a handshake in mid-stream would stall the relay
    try:
        context.load_cert_chain(config.cert_file, config.key_file)
    except ssl.SSLError as exc:
        raise TlsError(
            f"tls: {config.cert_file} and {config.key_file} are not a PEM certificate chain and "
            f"its private key ({exc.reason or exc})"
        ) from None
    except OSError as exc:
        name = exc.filename or f"{config.cert_file} or {config.key_file}"
        raise TlsError(f"tls: cannot read {name}: {exc.strerror or exc}") from None
    context.set_alpn_protocols([ALPN])
    context.sni_callback = _remember_sni
    return context


class Tls:
    """The daemon's TLS state: the client-facing context (None: TLS not offered) and the contexts
    for server connections, which are rebuilt on reload so that a renewed CA file is read."""

    def __init__(self, config: "Config") -> None:
        self.context = client_context(config.tls) if config.tls is not None else None

    def reload(self, config: "Config") -> None:
        """Load the certificate again (a renewed file at the same path counts); keep the current
        one when the new one cannot be used."""
        _server_contexts.clear()
        if config.tls is None:
            if self.context is not None:
                log.info("client TLS turned off: encryption requests are answered N")
            self.context = None
            return
        try:
            self.context = client_context(config.tls)
        except TlsError as exc:
            if self.context is None:
                log.error("TLS certificate reload failed: %s; TLS stays off", exc)
            else:
                log.error("TLS certificate reload failed: %s; keeping the previous certificate",
                          exc)


def direct_hello(sock: socket.socket) -> bool:
    """Whether the client opened with a TLS ClientHello rather than a packet (looked at, not read)."""
    return sock.recv(1, socket.MSG_PEEK) == _TLS_HANDSHAKE_RECORD


def accept(context: ssl.SSLContext, sock: socket.socket, address: tuple) -> ClientTlsSocket:
    """The server side of the handshake; a failed one is logged and ends the connection."""
    tls_sock = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    try:
        tls_sock.do_handshake()
    except OSError as exc:
        tls_sock.close()
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc) or type(exc).__name__
        if not isinstance(exc, (ssl.SSLEOFError, ConnectionError)) and "EOF" not in reason:
            # A client that just goes away (a health probe) is not worth an info line.
            log.info("client TLS handshake failed: addr=%s reason=%s", address[0], reason)
        raise ClientGone(f"TLS handshake failed: {reason}") from None
    tls_sock.established = True
    return tls_sock


def check_direct(sock: ClientTlsSocket) -> None:
    """Direct TLS must have negotiated ALPN "postgresql", as PostgreSQL 17 requires (it keeps TLS
    connections meant for another protocol from being taken for Postgres ones)."""
    if sock.selected_alpn_protocol() != ALPN:
        raise p.ProtocolError(
            f'direct TLS connection without ALPN protocol "{ALPN}": use sslnegotiation=postgres '
            "or a client that negotiates ALPN"
        )


def encrypted(sock: socket.socket) -> bool:
    return isinstance(sock, ssl.SSLSocket)


def sni_host(sock: socket.socket) -> str | None:
    """The host name the client asked for in TLS SNI, lowercased; None without TLS or SNI."""
    return getattr(sock, "sni_host", None)


def check_required(tenant: "TenantConfig", sock: socket.socket) -> None:
    """Refuse a plaintext client of a tenant with enforce_ssl (28000, before any password)."""
    if tenant.enforce_ssl and not encrypted(sock):
        raise Refusal(
            "28000", f'SSL required: tenant "{tenant.id}" refuses connections without TLS '
            "(connect with sslmode=require)"
        )


# ------------------------------------------------------------------------------- towards Postgres


@dataclass(frozen=True)
class ServerTls:
    """How server connections of a pool use TLS; part of the pool's target, so that a change on
    reload retires the connections opened the old way."""

    mode: str = "disable"
    ca_file: str | None = None


def server_tls(tenant: "TenantConfig") -> ServerTls:
    return ServerTls(tenant.server_tls, tenant.server_tls_ca_file)


def libpq_params(settings: ServerTls) -> dict[str, str]:
    """The same TLS for a connection gpooler makes through libpq (psycopg2: auth_query).

    Without server_tls_ca_file, verify-ca and verify-full trust the system's CAs (libpq's
    `sslrootcert=system`), as gpooler's own server connections do.
    """
    params = {"sslmode": settings.mode}
    if settings.mode in ("verify-ca", "verify-full"):
        params["sslrootcert"] = settings.ca_file or "system"
    return params


_server_contexts: dict[ServerTls, ssl.SSLContext] = {}


def server_context(settings: ServerTls) -> ssl.SSLContext:
    """The client-side context for a mode and CA file, built once per reload."""
    context = _server_contexts.get(settings)
    if context is not None:
        return context
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_RENEGOTIATION
    if settings.mode in ("verify-ca", "verify-full"):
        context.check_hostname = settings.mode == "verify-full"
        context.verify_mode = ssl.CERT_REQUIRED
        if settings.ca_file:
            try:
                context.load_verify_locations(cafile=settings.ca_file)
            except ssl.SSLError as exc:
                raise TlsError(f"server_tls_ca_file {settings.ca_file} holds no PEM certificate "
                               f"({exc.reason or exc})") from None
            except OSError as exc:
                raise TlsError(f"cannot read server_tls_ca_file {settings.ca_file}: "
                               f"{exc.strerror or exc}") from None
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    _server_contexts[settings] = context
    return context


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def connect_server(sock: socket.socket, settings: ServerTls, host: str) -> socket.socket:
    """Negotiate TLS on a fresh connection to Postgres as the mode says; returns the socket to
    use (the same one when plain). Raises TlsError (an OSError) with what went wrong; the caller
    closes `sock` then, and this closes any TLS socket it made."""
    mode = settings.mode
    if mode == "disable":
        return sock
    context = server_context(settings)
    sock.sendall(_SSL_REQUEST)
    answer = sock.recv(1)
    if not answer:
        raise TlsError("server closed the connection after the SSL request")
    if answer == b"N":
        if mode == "prefer":
            return sock
        raise TlsError(f"server does not support SSL, but server_tls is {mode}")
    if answer != b"S":
        raise TlsError(f"server answered the SSL request with {answer!r} instead of S or N")
    # SNI as libpq sends it: the host name, never an address; verify-full checks the name.
    name = host if mode == "verify-full" or not _is_ip(host) else None
    tls_sock = context.wrap_socket(sock, server_hostname=name, do_handshake_on_connect=False)
    try:
        tls_sock.do_handshake()
    except ssl.SSLCertVerificationError as exc:
        tls_sock.close()
        raise TlsError(f"server certificate verification failed (server_tls {mode}): "
                       f"{exc.verify_message or exc.reason or exc}") from None
    except ssl.SSLError as exc:
        tls_sock.close()
        raise TlsError(f"TLS handshake failed (server_tls {mode}): {exc.reason or exc}") from None
    except BaseException:
        tls_sock.close()
        raise
    return tls_sock


def check_files(config: "Config") -> None:
    """Load every certificate, key and CA file the configuration names, so that `--check` and
    startup report a bad one; raises TlsError."""
    if config.tls is not None:
        client_context(config.tls)
    for tenant in config.tenants.values():
        settings = server_tls(tenant)
        if settings.mode in ("verify-ca", "verify-full") and settings.ca_file:
            try:
                server_context(settings)
            except TlsError as exc:
                raise TlsError(f"tenants.{tenant.id}: {exc}") from None
    _server_contexts.clear()
