"""Who a new client is: tenant, user, database and session settings, decided from its startup packet.

Pure: the configuration and the packet in, a Login or a Refusal out. The order in which the tenant
is found is part of the contract: the `user.tenant` suffix, then `options` (`-c tenant=ID` or
`--tenant=ID`), then the TLS SNI hostname, then the only or the default tenant.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from gpooler import protocol as p
from gpooler.config import Config, TenantConfig, UserConfig, find_user

# Startup parameters that are about the connection, not settings for the server session.
_CONNECTION_PARAMS = frozenset({"user", "database", "options", "replication"})


class Refusal(Exception):
    """A client is turned away: told with a FATAL ErrorResponse carrying this SQLSTATE."""

    def __init__(self, sqlstate: str, text: str) -> None:
        super().__init__(text)
        self.sqlstate = sqlstate
        self.text = text

    def response(self) -> bytes:
        return p.error_response(self.sqlstate, self.text, "FATAL")


@dataclass(frozen=True)
class Login:
    tenant: TenantConfig
    user: UserConfig
    login_name: str  # the user name as the client sent it
    database: str
    settings: dict[str, str]  # session settings to carry to every server connection it uses


def resolve(config: Config, params: dict[str, str], sni_host: str | None = None) -> Login:
    """Decide tenant, user and settings, or raise Refusal (28000 for who, 08P01 for malformed)."""
    login_name = params.get("user", "")
    if not login_name:
        raise Refusal("28000", "no PostgreSQL user name specified in startup packet")
    if "replication" in params and params["replication"].lower() not in ("false", "off", "no", "0"):
        raise Refusal("0A000", "replication connections are not supported by gpooler")
    try:
        option_settings = p.options_settings(params.get("options", ""))
    except p.ProtocolError as exc:
        raise Refusal("08P01", str(exc)) from None

    tenants = config.tenants
    user_name, dot, suffix = login_name.rpartition(".")
    tenant_id = suffix if dot and user_name and suffix in tenants else None
    if tenant_id is None:
        user_name = login_name
    option_tenant = None
    settings: dict[str, str] = {}
    # Setting names are case-insensitive in Postgres; one spelling keeps the books simple.
    for key, value in params.items():
        if key not in _CONNECTION_PARAMS and not key.startswith("_pq_."):
            settings[key.lower()] = value
    for name, value in option_settings:
        if name.lower() == "tenant":
            option_tenant = value
        else:
            settings[name.lower()] = value
    if tenant_id is None:
        tenant_id = option_tenant or _tenant_from_sni(config, sni_host) or _default_tenant(config)
    if tenant_id is None:
        raise Refusal(
            "28000",
            f'no tenant given for user "{login_name}": log in as "<user>.<tenant>" '
            "or pass options=-ctenant=<tenant>",
        )
    tenant = tenants.get(tenant_id)
    if tenant is None:
        raise Refusal("28000", f'unknown tenant "{tenant_id}"')
    user = find_user(tenant, user_name)
    if user is None:
        raise Refusal("28000", f'unknown user "{user_name}" in tenant "{tenant_id}"')
    database = params.get("database") or tenant.database
    if database == login_name and user_name != login_name:
        # libpq names the database after the user when none is given; "app.acme" is no database.
        database = tenant.database
    return Login(tenant, user, login_name, database, settings)


def _tenant_from_sni(config: Config, sni_host: str | None) -> str | None:
    if not sni_host:
        return None
    for tenant in config.tenants.values():
        if tenant.sni_hostname and tenant.sni_hostname.lower() == sni_host.lower():
            return tenant.id
    label = sni_host.split(".", 1)[0]
    return label if label in config.tenants else None


def _default_tenant(config: Config) -> str | None:
    if len(config.tenants) == 1:
        return next(iter(config.tenants))
    for tenant in config.tenants.values():
        if tenant.default:
            return tenant.id
    return None


def client_ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A peer address as the client knows itself: no IPv6 zone, IPv4-mapped IPv6 as IPv4."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def check_address(tenant: TenantConfig, address: str) -> None:
    """Refuse an address outside the tenant's allow_list, before any password is asked."""
    ip = client_ip(address)
    if not any(ip in network for network in tenant.allow_list if network.version == ip.version):
        raise Refusal("28000", f'address {ip} is not allowed for tenant "{tenant.id}"')
