"""gpooler: a multi-tenant Postgres connection pooler on gevent."""

__version__ = "0.1.0"
