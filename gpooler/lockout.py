"""Brute-force protection: an address that keeps failing passwords is turned away for a while.

Per (tenant, client address): `auth_failure_limit` wrong passwords within `auth_failure_window`
seconds (counted from the first of them) lock the address out of the tenant for `auth_lockout`
seconds. While it is locked out, every login from it to that tenant is refused with 28000 before
any password is asked, whatever the user: a lockout that let a right password through would still
let a guesser find it. Only wrong passwords count: an unknown user or tenant is refused before any
password is asked, so it guesses nothing. A right password neither counts nor clears the count:
if it did, one known password would buy an attacker as many guesses at the others as they like.

The book lives in one process: with `workers: N` each worker keeps its own, so an address gets up
to N times the limit. Its memory is bounded: an entry is forgotten once its window and lockout are
over, and at most `capacity` addresses are kept (those that failed longest ago are dropped first),
so a flood of addresses cannot grow it without end. The clock is passed in, for the unit tests.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from gpooler.config import TenantConfig
from gpooler.login import Refusal, client_ip

log = logging.getLogger(__name__)

MAX_ADDRESSES = 10_000


@dataclass
class _Entry:
    since: float  # the first wrong password of the current window
    failures: int = 0
    until: float = 0.0  # locked out until then
    expires: float = 0.0  # nothing left to remember after this


class FailureBook:
    """Recent wrong passwords per (tenant, address), and the addresses locked out."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, capacity: int = MAX_ADDRESSES
    ) -> None:
        self._clock = clock
        self._capacity = capacity
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()  # last failed last

    def __len__(self) -> int:
        return len(self._entries)

    @contextmanager
    def guard(self, tenant: TenantConfig, address: str) -> Iterator[None]:
        """Around a password exchange: refuse a locked-out address first, count a wrong password
        (a 28P01 refusal) after."""
        self.check(tenant, address)
        try:
            yield
        except Refusal as refusal:
            if refusal.sqlstate == "28P01":
                self.failed(tenant, address)
            raise

    def check(self, tenant: TenantConfig, address: str) -> None:
        """Raise a 28000 Refusal while the address is locked out of the tenant."""
        if not (tenant.auth_failure_limit and tenant.auth_lockout):
            return
        ip = str(client_ip(address))
        entry = self._entries.get((tenant.id, ip))
        left = entry.until - self._clock() if entry is not None else 0.0
        if left > 0:
            raise Refusal(
                "28000",
                f'address {ip} is locked out of tenant "{tenant.id}" after too many failed '
                f"logins: try again in {math.ceil(left)}s",
            )

    def failed(self, tenant: TenantConfig, address: str) -> None:
        """Count a wrong password; the one that reaches the limit locks the address out."""
        limit, window, lockout = (
            tenant.auth_failure_limit, tenant.auth_failure_window, tenant.auth_lockout)
        if not (limit and lockout):
            return
        now = self._clock()
        self._forget(now)
        ip = str(client_ip(address))
        key = (tenant.id, ip)
        entry = self._entries.pop(key, None) or _Entry(now)
        if now >= entry.since + window:
            entry.since, entry.failures = now, 0
        entry.failures += 1
        if entry.failures >= limit:
            log.warning('address %s locked out of tenant "%s" for %gs after %d wrong passwords '
                        "within %gs", ip, tenant.id, lockout, entry.failures, window)
            entry.until = now + lockout
            entry.since, entry.failures = now, 0
        entry.expires = max(entry.since + window, entry.until)
        self._entries[key] = entry
        while len(self._entries) > self._capacity:
            self._entries.popitem(last=False)

    def _forget(self, now: float) -> None:
        """Drop the entries at the old end that have nothing left to say."""
        entries = self._entries
        while entries and next(iter(entries.values())).expires <= now:
            entries.popitem(last=False)
