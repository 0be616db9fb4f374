"""Logging setup: `log_level` and `log_format` (text or json), both changeable on reload.

Every log line goes to stderr through one handler on the root logger. Text lines read
`2024-05-01 12:00:00,123 INFO gpooler.client: client connected: tenant=acme user=app ...`;
JSON lines are one object each: time, level, logger, message, and the structured fields a call
passes in `extra` (see FIELDS) when it has them, e.g.

    log.info("client connected: %s", client.describe(), extra=logs.client_fields(client))

Nothing secret is ever a field: passwords and startup packets are never logged.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpooler.config import Config

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIELDS = ("tenant", "user", "addr", "db", "mode", "duration", "reason", "command")
_SAFE = re.compile(r"[\w.@+:/\[\]-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

_handler: logging.Handler | None = None


class JsonFormatter(logging.Formatter):
    """One JSON object per line; newlines and control characters inside values are escaped."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        entry: dict[str, Any] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class TextFormatter(logging.Formatter):
    """One line per event: control characters in the message (a newline in a user name a client
    chose, say) are escaped, so no client can forge a line of its own. Tracebacks keep theirs."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:
        return _CONTROL.sub(_escape, super().formatMessage(record))


def _escape(found: re.Match) -> str:
    return f"\\x{ord(found.group()):02x}"


def _formatter(log_format: str) -> logging.Formatter:
    return JsonFormatter() if log_format == "json" else TextFormatter()


def setup(config: "Config") -> None:
    """Install the stderr handler with the configured level and format (at start)."""
    global _handler
    root = logging.getLogger()
    if _handler is None:
        _handler = logging.StreamHandler(sys.stderr)
        root.addHandler(_handler)
    apply(config)


def apply(config: "Config") -> None:
    """Take over log_level and log_format from a (re)loaded configuration."""
    logging.getLogger().setLevel(config.log_level.upper())
    if _handler is not None:
        _handler.setFormatter(_formatter(config.log_format))


def safe(text: str) -> str:
    """Text from the network as one log token: quoted when it could be mistaken for more."""
    return text if text and _SAFE.fullmatch(text) else json.dumps(text)


def client_fields(client: Any, duration: float | None = None, reason: str | None = None) -> dict:
    """The structured fields of a client's log line (for `extra=`)."""
    login = client.login
    fields: dict[str, Any] = {"addr": client.peer}
    if login is not None:
        fields.update(tenant=login.tenant.id, user=login.user.name, db=login.database,
                      mode=client.mode)
    elif getattr(client, "login_name", None):
        fields["user"] = client.login_name
    if duration is not None:
        fields["duration"] = round(duration, 3)
    if reason is not None:
        fields["reason"] = reason
    return fields
