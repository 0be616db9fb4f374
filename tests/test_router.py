"""Unit tests for gpooler.router: pure text in, Classification out; no sockets, no Postgres.

Expected values come from the Postgres documentation (SQL command reference, "Lexical Structure")
and from what drivers and ORMs actually send (psycopg, asyncpg, SQLAlchemy, Django, pgjdbc, Rails,
Sequelize, Prisma), not from running the module. Session values are the text `SHOW name` prints
after the statement, where that is the same text the statement wrote (checked against a live
server when these tables were written: see the module docstring of gpooler.router for the rules).
"""

from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gpooler import router
from gpooler.router import Classification, Statement, classify, hint

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def one(sql: str) -> Statement:
    """The single statement of sql (fails the test if there are more or fewer)."""
    c = classify(sql)
    assert len(c.statements) == 1, c
    return c.statements[0]


def ids(cases):
    return [repr(c[0] if isinstance(c, tuple) else c)[:60] for c in cases]


@pytest.fixture(autouse=True)
def fresh_cache():
    """Each test starts from an empty cache of the default size, and leaves it that way."""
    router.set_cache_size(10000)
    router.clear_cache()
    yield
    router.set_cache_size(10000)
    router.clear_cache()


# ------------------------------------------------------------------------------------ read_only

READ_ONLY = [
    "SELECT 1",
    "select 1",
    "SELECT 1;",
    "  \n SELECT 1  ",
    "select * from t where id = $1",
    "SELECT u.id, u.name FROM users u JOIN orders o ON o.user_id = u.id WHERE u.id = $1 "
    "ORDER BY 1 LIMIT 20",
    'SELECT "auth_user"."id", "auth_user"."username" FROM "auth_user" '
    'WHERE "auth_user"."id" = 1 LIMIT 21',  # Django
    "SELECT users.id AS users_id, users.name AS users_name FROM users WHERE users.id = $1",
    "SELECT a FROM t WHERE b = ANY($1::int[])",
    "SELECT count(*) FILTER (WHERE a) FROM t",
    "SELECT pg_catalog.version()",
    "select current_schema()",
    "SELECT current_setting('transaction_isolation')",
    "SELECT now(), pg_backend_pid()",
    "VALUES (1), (2)",
    "TABLE t",
    "(SELECT 1) UNION (SELECT 2)",
    "SELECT 1 UNION ALL SELECT 2 EXCEPT SELECT 3",
    "WITH x AS (SELECT 1 AS a) SELECT a FROM x",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT * FROM r",
    "WITH x AS MATERIALIZED (SELECT 1) SELECT * FROM x",
    "SELECT * FROM generate_series(1, 3) g LEFT JOIN LATERAL (SELECT 1) s ON true",
    "SELECT $$FOR UPDATE; INSERT INTO t$$",
    "SELECT 'nextval(1)', E'pg_advisory_lock(\\'x\\')', \"nextval\" FROM t",
    "SELECT 1 -- nextval('s') FOR UPDATE\n",
    "SELECT /* INSERT INTO t VALUES (1); pg_advisory_lock(1) */ 1",
    "SELECT /* nested /* INTO x */ still comment */ 1",
    "SHOW search_path",
    "show standard_conforming_strings",
    "SHOW TRANSACTION ISOLATION LEVEL",
    "SHOW ALL",
    "EXPLAIN SELECT * FROM t",
    "EXPLAIN SELECT nextval('s')",
    "EXPLAIN INSERT INTO t VALUES (1)",
    "EXPLAIN VERBOSE DELETE FROM t",
    "EXPLAIN (FORMAT JSON, COSTS off) UPDATE t SET a = 1",
    "EXPLAIN (ANALYZE false) INSERT INTO t VALUES (1)",
    "EXPLAIN (ANALYZE off, BUFFERS) INSERT INTO t VALUES (1)",
    "EXPLAIN ANALYZE SELECT * FROM t",
    "EXPLAIN (ANALYZE, BUFFERS) SELECT * FROM t",
    "EXPLAIN (ANALYZE true) SELECT 1",
    "/* gpooler:replica */ SELECT 1",
    "SELECT 1 /* application='my-app',route='%2Fusers' */",
]

NOT_READ_ONLY = [
    # data-modifying CTEs
    "WITH x AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM x",
    "WITH d AS (DELETE FROM t WHERE id = $1 RETURNING *) SELECT count(*) FROM d",
    "WITH u AS (UPDATE t SET a = 1 RETURNING *) SELECT 1",
    "WITH m AS (MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE RETURNING *) SELECT 1",
    "WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x",
    "WITH a AS (SELECT 1), b AS (INSERT INTO t VALUES (2) RETURNING 1) SELECT * FROM a, b",
    # locking clauses
    "SELECT * FROM t FOR UPDATE",
    "select * from t where id = $1 for update",
    "SELECT * FROM t FOR NO KEY UPDATE",
    "SELECT * FROM t FOR SHARE",
    "SELECT * FROM t FOR KEY SHARE SKIP LOCKED",
    "SELECT * FROM t t2 FOR UPDATE OF t2 NOWAIT",
    'SELECT "app_item"."id" FROM "app_item" WHERE "app_item"."id" = 1 LIMIT 1 FOR UPDATE',
    "SELECT * FROM (SELECT * FROM t FOR UPDATE) s",
    "SELECT 1 UNION SELECT 2 FOR UPDATE",
    # SELECT INTO
    "SELECT * INTO t2 FROM t",
    "SELECT * INTO UNLOGGED t2 FROM t",
    # functions that write or are session-bound
    "SELECT nextval('s')",
    "SELECT pg_catalog.nextval('s')",
    "select NEXTVAL('s')",
    "SELECT setval('s', 10)",
    "SELECT currval('s')",
    "SELECT lastval()",
    "SELECT pg_advisory_lock(1)",
    "SELECT pg_try_advisory_lock(1, 2)",
    "SELECT pg_advisory_xact_lock(1)",
    "SELECT pg_try_advisory_xact_lock_shared(1)",
    "SELECT pg_advisory_unlock(1)",
    "SELECT pg_advisory_unlock_all()",
    "SELECT set_config('search_path', 'x', false)",
    "SELECT set_config('request.jwt.claims', $1, true)",
    "SELECT pg_notify('ch', 'payload')",
    "SELECT lo_import('/tmp/x')",
    "SELECT lo_unlink(1234)",
    "SELECT lo_from_bytea(0, '\\x00')",
    "SELECT txid_current()",
    "SELECT pg_current_xact_id()",
    "SELECT dblink_exec('conn', 'INSERT INTO t VALUES (1)')",
    "SELECT * FROM dblink('conn', 'SELECT 1') AS t(a int)",
    "SELECT pg_terminate_backend(123)",
    "SELECT pg_listening_channels()",
    "SELECT setseed(0.5)",
    "SELECT id FROM t WHERE id = nextval('s')",
    "SELECT a, (SELECT nextval('s')) FROM t",
    "VALUES (nextval('s'))",
    "WITH x AS (SELECT nextval('s')) SELECT * FROM x",
    # EXPLAIN ANALYZE runs the statement
    "EXPLAIN ANALYZE INSERT INTO t VALUES (1)",
    "EXPLAIN ANALYZE SELECT nextval('s')",
    "EXPLAIN (ANALYZE) DELETE FROM t",
    "EXPLAIN (ANALYZE 1, VERBOSE) UPDATE t SET a = 1",
    "EXPLAIN ANALYSE SELECT * FROM t FOR UPDATE",
    "EXPLAIN ANALYZE VERBOSE WITH x AS (DELETE FROM t RETURNING 1) SELECT 1",
    # everything that is not a query
    "INSERT INTO t (a) VALUES ($1) RETURNING id",
    'INSERT INTO "auth_user" ("password", "username") VALUES (\'x\', \'y\') '
    'RETURNING "auth_user"."id"',
    "UPDATE t SET a = $1 WHERE id = $2",
    "DELETE FROM t WHERE id = $1",
    "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = s.a",
    "COPY t FROM STDIN",
    "COPY (SELECT 1) TO STDOUT",
    "CALL p(1)",
    "DO $$BEGIN PERFORM 1; END$$",
    "CREATE TABLE t (id int)",
    "ALTER TABLE t ADD COLUMN b int",
    "DROP TABLE t",
    "TRUNCATE t",
    "VACUUM ANALYZE t",
    "LOCK TABLE t IN ACCESS SHARE MODE",
    "NOTIFY ch, 'x'",
    "GRANT SELECT ON t TO u",
    "BEGIN",
    "BEGIN READ ONLY",
    "COMMIT",
    "SET search_path TO a",
    "PREPARE p AS SELECT 1",
    "EXECUTE p",
    "DECLARE c CURSOR FOR SELECT 1",
    "FETCH 10 FROM c",
    "LISTEN ch",
    "DISCARD ALL",
    "",
]


@pytest.mark.parametrize("sql", READ_ONLY, ids=ids(READ_ONLY))
def test_read_only(sql):
    c = classify(sql)
    assert c.read_only, c
    assert all(s.read_only and s.parsed for s in c.statements)


@pytest.mark.parametrize("sql", NOT_READ_ONLY, ids=ids(NOT_READ_ONLY))
def test_not_read_only(sql):
    c = classify(sql)
    assert not c.read_only, c
    assert not any(s.read_only for s in c.statements)


def test_every_listed_writing_function_blocks_the_replica():
    names = sorted(router._WRITE_FUNCS) + [p + "x" for p in router._WRITE_PREFIXES]
    for name in names:
        assert not classify(f"SELECT {name}(1)").read_only, name
        assert not classify(f"SELECT pg_catalog.{name}(1) FROM t").read_only, name


# ------------------------------------------------------------------------------------ transaction

TRANSACTION = [
    ("BEGIN", "begin"),
    ("begin", "begin"),
    ("BEGIN;", "begin"),
    ("BEGIN WORK", "begin"),
    ("BEGIN TRANSACTION", "begin"),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE", "begin"),
    ("BEGIN ISOLATION LEVEL REPEATABLE READ READ WRITE", "begin"),
    ("BEGIN READ ONLY", "begin_read_only"),
    ("begin transaction read only", "begin_read_only"),
    ("BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE", "begin_read_only"),  # asyncpg
    ("BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY", "begin_read_only"),  # psycopg 3
    ("BEGIN READ ONLY, READ WRITE", "begin"),  # the last mode wins
    ("START TRANSACTION", "begin"),
    ("START TRANSACTION;", "begin"),  # Sequelize
    ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ ONLY", "begin_read_only"),
    ("START TRANSACTION READ ONLY DEFERRABLE", "begin_read_only"),
    ("start transaction read write", "begin"),
    ("COMMIT", "commit"),
    ("commit", "commit"),
    ("COMMIT WORK", "commit"),
    ("COMMIT TRANSACTION", "commit"),
    ("COMMIT AND CHAIN", "commit"),
    ("COMMIT AND NO CHAIN", "commit"),
    ("END", "commit"),
    ("END TRANSACTION", "commit"),
    ("ROLLBACK", "rollback"),
    ("rollback", "rollback"),
    ("ROLLBACK WORK", "rollback"),
    ("ROLLBACK AND CHAIN", "rollback"),
    ("ABORT", "rollback"),
    ("ABORT TRANSACTION", "rollback"),
    ("SAVEPOINT s1", "savepoint"),
    ('SAVEPOINT "s140_x1"', "savepoint"),  # Django
    ("SAVEPOINT _pg3_1", "savepoint"),  # psycopg 3
    ("RELEASE SAVEPOINT s1", "release"),
    ("RELEASE s1", "release"),
    ('RELEASE SAVEPOINT "s140_x1"', "release"),
    ("ROLLBACK TO SAVEPOINT s1", "rollback_to"),
    ("ROLLBACK TO s1", "rollback_to"),
    ("ROLLBACK WORK TO SAVEPOINT s1", "rollback_to"),
    ('ROLLBACK TO SAVEPOINT "s140_x1"', "rollback_to"),
    ("PREPARE TRANSACTION 'gid-1'", "prepare_transaction"),
    ("COMMIT PREPARED 'gid-1'", None),
    ("ROLLBACK PREPARED 'gid-1'", None),
    ("SELECT 1", None),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", None),
    ("DO $$BEGIN COMMIT; END$$", None),
]


@pytest.mark.parametrize("sql, expected", TRANSACTION, ids=ids(TRANSACTION))
def test_transaction(sql, expected):
    s = one(sql)
    assert s.parsed
    assert s.transaction == expected


# ------------------------------------------------------------------------------------ session

SESSION = [
    ("SET search_path TO a, b", (("set", "search_path", "a, b"),)),
    ("SET search_path = a,b", (("set", "search_path", "a, b"),)),
    ("SET search_path TO public", (("set", "search_path", "public"),)),
    ("SET search_path TO MySchema, \"Other\"", (("set", "search_path", 'myschema, "Other"'),)),
    ('SET search_path = "$user", public', (("set", "search_path", '"$user", public'),)),
    # one literal naming one schema that has a comma in its name: Postgres quotes it
    ("SET search_path = 'a, b'", (("set", "search_path", '"a, b"'),)),
    ("SET search_path TO DEFAULT", (("reset", "search_path"),)),
    ("SET search_path = default", (("reset", "search_path"),)),
    ("SET statement_timeout = '5s'", (("set", "statement_timeout", "5s"),)),
    ("SET statement_timeout TO 5000", (("set", "statement_timeout", "5000"),)),
    ("SET SESSION statement_timeout = 0", (("set", "statement_timeout", "0"),)),
    ("SET application_name = 'my app'", (("set", "application_name", "my app"),)),
    ("SET application_name TO MyApp", (("set", "application_name", "myapp"),)),
    ("SET application_name = $$dollar quoted$$", (("set", "application_name", "dollar quoted"),)),
    ("SET application_name = 'it''s'", (("set", "application_name", "it's"),)),
    ("SET application_name = E'tab\\there'", (("set", "application_name", "tab\there"),)),
    ("SET Application_Name = 'x'", (("set", "application_name", "x"),)),
    ("SET client_min_messages TO 'warning'", (("set", "client_min_messages", "warning"),)),  # Rails
    ("SET standard_conforming_strings = on", (("set", "standard_conforming_strings", "on"),)),
    ("SET intervalstyle = iso_8601", (("set", "intervalstyle", "iso_8601"),)),
    ("SET datestyle TO ISO, MDY", (("set", "datestyle", "iso, mdy"),)),
    ("SET extra_float_digits = 3", (("set", "extra_float_digits", "3"),)),  # pgjdbc
    ("SET extra_float_digits = -1", (("set", "extra_float_digits", "-1"),)),
    ("SET work_mem = '64MB'", (("set", "work_mem", "64MB"),)),
    ("SET myapp.tenant_id = '42'", (("set", "myapp.tenant_id", "42"),)),
    ("SET MyApp.Tenant TO acme", (("set", "myapp.tenant", "acme"),)),
    ("SET TIME ZONE 'UTC'", (("set", "timezone", "UTC"),)),  # Django
    ("SET TIME ZONE 'Europe/Paris'", (("set", "timezone", "Europe/Paris"),)),
    ("SET SESSION TIME ZONE 'UTC'", (("set", "timezone", "UTC"),)),
    ("SET TIME ZONE LOCAL", (("reset", "timezone"),)),
    ("SET TIME ZONE DEFAULT", (("reset", "timezone"),)),
    ("SET TIME ZONE -7", (("set", "timezone", "-7"),)),
    ("SET timezone TO 'UTC'", (("set", "timezone", "UTC"),)),
    ("SET SESSION timezone TO 'UTC'", (("set", "timezone", "UTC"),)),
    ("SET NAMES 'UTF8'", (("set", "client_encoding", "UTF8"),)),
    ("SET client_encoding TO 'UTF8'", (("set", "client_encoding", "UTF8"),)),
    ("SET SCHEMA 'tenant_1'", (("set", "search_path", "tenant_1"),)),
    ("SET SCHEMA 'Tenant'", (("set", "search_path", '"Tenant"'),)),
    ("SET ROLE admin", (("set", "role", "admin"),)),
    ("SET ROLE NONE", (("set", "role", "none"),)),
    ("SET SESSION AUTHORIZATION bob", (("set", "session_authorization", "bob"),)),
    ("SET SESSION AUTHORIZATION DEFAULT", (("reset", "session_authorization"),)),
    ("SET xmloption TO document", (("set", "xmloption", "document"),)),
    ("SET XML OPTION CONTENT", (("set", "xmloption", "content"),)),
    (
        "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",  # pgjdbc setReadOnly(true)
        (("set", "default_transaction_read_only", "on"),),
    ),
    (
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ WRITE",
        (
            ("set", "default_transaction_isolation", "repeatable read"),
            ("set", "default_transaction_read_only", "off"),
        ),
    ),
    (
        "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL READ COMMITTED NOT DEFERRABLE",
        (
            ("set", "default_transaction_isolation", "read committed"),
            ("set", "default_transaction_deferrable", "off"),
        ),
    ),
    # transaction-local: nothing outlives the transaction
    ("SET LOCAL statement_timeout = '1s'", ()),
    ("SET LOCAL search_path TO a", ()),
    ("SET LOCAL TIME ZONE 'UTC'", ()),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", ()),
    ("SET TRANSACTION READ ONLY", ()),
    ("SET TRANSACTION SNAPSHOT '00000003-0000001B-1'", ()),
    ("SET CONSTRAINTS ALL DEFERRED", ()),
    ("SET statement_timeout FROM CURRENT", ()),
    # RESET
    ("RESET ALL", (("reset_all",),)),
    ("reset all", (("reset_all",),)),
    ("RESET search_path", (("reset", "search_path"),)),
    ("RESET Statement_Timeout", (("reset", "statement_timeout"),)),
    ("RESET myapp.tenant_id", (("reset", "myapp.tenant_id"),)),
    ("RESET TIME ZONE", (("reset", "timezone"),)),
    ("RESET ROLE", (("reset", "role"),)),
    ("RESET SESSION AUTHORIZATION", (("reset", "session_authorization"),)),
    ("RESET TRANSACTION ISOLATION LEVEL", ()),
    # set_config
    ("SELECT set_config('search_path', 'x', false)", (("set_config", "search_path", "x"),)),
    (
        "SELECT pg_catalog.set_config('Search_Path', 'a, b', false)",
        (("set_config", "search_path", "a, b"),),
    ),
    ("select set_config('myapp.user', 'u1', 'false')", (("set_config", "myapp.user", "u1"),)),
    (
        "SELECT set_config('a.b', 'x', false), set_config('c.d', 'y', false)",
        (("set_config", "a.b", "x"), ("set_config", "c.d", "y")),
    ),
    ("SELECT set_config('search_path', 'x', true)", ()),
    ("SELECT set_config('request.jwt.claims', $1, true)", ()),  # PostgREST
    ("SELECT set_config('role', 'admin', 'on')", ()),
    ("SELECT 'set_config(''a'', ''b'', false)'", ()),
    ("SELECT 1 -- set_config('a', 'b', false)", ()),
    ("EXPLAIN SELECT set_config('a.b', 'x', false)", ()),  # EXPLAIN does not run it
    ("EXPLAIN ANALYZE SELECT set_config('a.b', 'x', false)", (("set_config", "a.b", "x"),)),
    ("PREPARE p AS SELECT set_config('a.b', 'x', false)", ()),  # nor does PREPARE
    ("SELECT 1", ()),
    ("SHOW search_path", ()),
]


@pytest.mark.parametrize("sql, expected", SESSION, ids=ids(SESSION))
def test_session(sql, expected):
    s = one(sql)
    assert s.parsed
    assert s.session == expected


def test_set_config_with_unknown_value_pins_instead_of_guessing():
    s = one("SELECT set_config('search_path', $1, false)")
    assert s.session == ()
    assert s.pins == {"set_config"}
    assert one("SELECT set_config($1, $2, $3)").pins == {"set_config"}
    assert one("SELECT set_config('a.b', 'x', $1)").pins == {"set_config"}
    assert one("SELECT set_config('a.b', 'x', true)").pins == frozenset()


# ------------------------------------------------------------------------------------ prepared

PREPARED = [
    ("PREPARE p1 (int) AS SELECT $1", ("prepare", "p1", "int", "SELECT $1")),
    ("PREPARE p1(int, text) AS SELECT $1, $2", ("prepare", "p1", "int, text", "SELECT $1, $2")),
    ("PREPARE p2 AS SELECT * FROM t", ("prepare", "p2", None, "SELECT * FROM t")),
    ("prepare P3 as insert into t values (1)", ("prepare", "p3", None, "insert into t values (1)")),
    (
        'PREPARE "MyPlan" (numeric(10, 2)) AS\n  SELECT $1',
        ("prepare", "MyPlan", "numeric(10, 2)", "SELECT $1"),
    ),
    ("EXECUTE p1(1)", ("execute", "p1")),
    ("EXECUTE p1 (1, 'x')", ("execute", "p1")),
    ("EXECUTE p2", ("execute", "p2")),
    ('EXECUTE "MyPlan"(1)', ("execute", "MyPlan")),
    ("DEALLOCATE ALL", ("deallocate_all",)),
    ("deallocate all", ("deallocate_all",)),
    ("DEALLOCATE PREPARE ALL", ("deallocate_all",)),
    ("DEALLOCATE p1", ("deallocate", "p1")),
    ("DEALLOCATE PREPARE p1", ("deallocate", "p1")),
    ('DEALLOCATE "MyPlan"', ("deallocate", "MyPlan")),
    ("DEALLOCATE prepare", ("deallocate", "prepare")),  # a statement named "prepare"
    ("EXPLAIN EXECUTE p1(1)", ("execute", "p1")),  # EXPLAIN needs p1 on this connection too
    ("EXPLAIN ANALYZE EXECUTE p1(1)", ("execute", "p1")),
    ("PREPARE TRANSACTION 'x'", None),
    ("SELECT 1", None),
]


@pytest.mark.parametrize("sql, expected", PREPARED, ids=ids(PREPARED))
def test_prepared(sql, expected):
    s = one(sql)
    assert s.parsed
    assert s.prepared == expected


def test_explain_execute_is_read_only_only_without_analyze():
    assert one("EXPLAIN EXECUTE p1(1)").read_only
    assert not one("EXPLAIN ANALYZE EXECUTE p1(1)").read_only


def test_prepare_body_is_classified_on_its_own():
    s = one("PREPARE p AS WITH x AS (DELETE FROM t RETURNING 1) SELECT * FROM x")
    assert not s.read_only
    assert not classify(s.prepared[3]).read_only
    assert classify(one("PREPARE q (int) AS SELECT $1").prepared[3]).read_only


# ------------------------------------------------------------------------------------ discard, pins

DISCARD = [
    ("DISCARD ALL", "all"),
    ("discard all", "all"),
    ("DISCARD PLANS", "plans"),
    ("DISCARD SEQUENCES", "sequences"),
    ("DISCARD TEMP", "temp"),
    ("DISCARD TEMPORARY", "temp"),
    ("SELECT 1", None),
]


@pytest.mark.parametrize("sql, expected", DISCARD, ids=ids(DISCARD))
def test_discard(sql, expected):
    s = one(sql)
    assert s.parsed
    assert s.discard == expected


PINS = [
    ("LISTEN ch", {"listen"}),
    ('LISTEN "MyChannel"', {"listen"}),
    ("listen virtual", {"listen"}),
    ("SELECT pg_advisory_lock(1)", {"advisory_lock"}),
    ("SELECT pg_advisory_lock(1, 2)", {"advisory_lock"}),
    ("SELECT pg_advisory_lock_shared(1)", {"advisory_lock"}),
    ("SELECT pg_try_advisory_lock(hashtext('job'))", {"advisory_lock"}),
    ("SELECT pg_try_advisory_lock_shared(1)", {"advisory_lock"}),
    ("select pg_catalog.pg_advisory_lock($1)", {"advisory_lock"}),
    ("SELECT id FROM jobs WHERE pg_try_advisory_lock(id) LIMIT 1", {"advisory_lock"}),
    ("SELECT pg_advisory_xact_lock(1)", set()),
    ("SELECT pg_try_advisory_xact_lock(1)", set()),
    ("SELECT pg_advisory_xact_lock_shared(1)", set()),
    ("CREATE TEMP TABLE t (x int)", {"temp_table"}),
    ("CREATE TEMPORARY TABLE t (x int) ON COMMIT DROP", {"temp_table"}),
    ("create temp table if not exists t as select 1", {"temp_table"}),
    ("CREATE GLOBAL TEMPORARY TABLE t (x int)", {"temp_table"}),
    ("CREATE LOCAL TEMP TABLE t (x int)", {"temp_table"}),
    ("CREATE TEMP VIEW v AS SELECT 1", {"temp_table"}),
    ("CREATE OR REPLACE TEMP VIEW v AS SELECT 1", {"temp_table"}),
    ("CREATE TEMP SEQUENCE s", {"temp_table"}),
    ("CREATE TABLE pg_temp.t (x int)", {"temp_table"}),
    ("CREATE VIEW pg_temp.v AS SELECT 1", {"temp_table"}),
    ("CREATE FUNCTION pg_temp.f() RETURNS int AS 'select 1' LANGUAGE sql", {"temp_table"}),
    ("SELECT * INTO TEMP t2 FROM t", {"temp_table"}),
    ("SELECT * INTO TEMPORARY TABLE t2 FROM t", {"temp_table"}),
    ("SELECT * INTO pg_temp.t2 FROM t", {"temp_table"}),
    ("CREATE TABLE t (x int)", set()),
    ("CREATE UNLOGGED TABLE t (x int)", set()),
    ("CREATE TABLE temp (x int)", set()),
    ("CREATE TABLE t (temp int)", set()),
    ("SELECT * INTO t2 FROM t", set()),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", {"cursor_with_hold"}),
    ("DECLARE c NO SCROLL CURSOR WITH HOLD FOR SELECT * FROM t", {"cursor_with_hold"}),
    ('DECLARE "c1" BINARY INSENSITIVE SCROLL CURSOR WITH HOLD FOR SELECT 1', {"cursor_with_hold"}),
    ("DECLARE c CURSOR FOR SELECT 1", set()),
    ("DECLARE c CURSOR WITHOUT HOLD FOR SELECT 1", set()),
    ("DECLARE c CURSOR FOR SELECT 'with hold'", set()),
    ("LOAD 'auto_explain'", {"load"}),
    ("LOAD '$libdir/plugins/auto_explain'", {"load"}),
    ("EXPLAIN ANALYZE SELECT pg_advisory_lock(1)", {"advisory_lock"}),
    ("EXPLAIN SELECT pg_advisory_lock(1)", set()),
    ("INSERT INTO t SELECT pg_advisory_lock(1)", {"advisory_lock"}),
    ("SELECT 'pg_advisory_lock(1)'", set()),
    ("SELECT 1 -- pg_advisory_lock(1)", set()),
    ("SELECT $x$ pg_advisory_lock(1) $x$", set()),
    ("SELECT pg_advisory_lock FROM t", set()),
    ("CREATE FUNCTION f() RETURNS void AS $$ SELECT pg_advisory_lock(1) $$ LANGUAGE sql", set()),
    ("CREATE VIEW v AS SELECT pg_advisory_lock(1)", set()),  # stored, not run
    ("PREPARE p AS SELECT pg_advisory_lock(1)", set()),
    ("SELECT 1", set()),
]


@pytest.mark.parametrize("sql, expected", PINS, ids=ids(PINS))
def test_pins(sql, expected):
    s = one(sql)
    assert s.parsed
    assert s.pins == expected


UNPINS = [
    ("UNLISTEN *", {"unlisten_all"}),
    ("UNLISTEN ch", {"unlisten"}),
    ('UNLISTEN "MyChannel"', {"unlisten"}),
    ("SELECT pg_advisory_unlock_all()", {"advisory_unlock_all"}),
    ("SELECT pg_advisory_unlock(1)", {"advisory_unlock"}),
    ("SELECT pg_advisory_unlock_shared(1, 2)", {"advisory_unlock"}),
    ("CLOSE ALL", {"close_all"}),
    ("CLOSE c", set()),
    ("DISCARD TEMP", {"discard_temp"}),
    ("DISCARD ALL", {"discard_temp", "unlisten_all", "advisory_unlock_all", "close_all"}),
    ("DISCARD PLANS", set()),
    ("SELECT 'pg_advisory_unlock_all()'", set()),
    ("SELECT 1", set()),
]


@pytest.mark.parametrize("sql, expected", UNPINS, ids=ids(UNPINS))
def test_unpins(sql, expected):
    s = one(sql)
    assert s.parsed
    assert s.unpins == expected


# ------------------------------------------------------------------------------------ parsed

UNPARSED = [
    "hello world",
    "FOO BAR",
    "garbage ( ) ;",
    "SELECT 'unterminated",
    'SELECT "unterminated',
    "SELECT $$unterminated",
    "SELECT /* unterminated comment",
    "SELECT /* nested /* only one closed */ 1",
    "SELECT FROM WHERE",
    "select 1 +",
    "SELECT (((1)",
    "LISTEN",
    "LISTEN 'ch'",
    "UNLISTEN",
    "LOAD auto_explain",
    "DISCARD",
    "DISCARD EVERYTHING",
    "DEALLOCATE",
    "EXECUTE",
    "PREPARE p",
    "PREPARE p (int SELECT 1",
    "SET",
    "SET x",
    "SET x y",
    "RESET",
    "START",
    "START something",
    "SAVEPOINT",
    "EXPLAIN",
    "EXPLAIN (ANALYZE",
    "DECLARE c",
    "12345",
    "$1",
    ")",
    "SELECT \x00 1",
    "\ufeffSELECT 1",
    "SELECT 1 \u2603 2",
]


@pytest.mark.parametrize("sql", UNPARSED, ids=ids(UNPARSED))
def test_unparsed(sql):
    c = classify(sql)
    assert not c.parsed
    assert not c.read_only
    assert any(not s.parsed for s in c.statements)
    for s in c.statements:
        if not s.parsed:
            assert s == Statement(parsed=False), s


def test_unparsed_query_still_reports_pins_the_lexer_saw():
    # sqlglot cannot parse these (x::oid[]), Postgres can: a missed pin would leak a lock
    s = one("SELECT pg_advisory_lock(1) FROM t WHERE a = ANY($1::oid[])")
    assert not s.parsed and not s.read_only
    assert s.pins == {"advisory_lock"}
    s = one("SELECT set_config('a.b', 'x', false) FROM t WHERE a = ANY($1::oid[])")
    assert s.session == (("set_config", "a.b", "x"),)


def test_long_texts_are_not_parsed():
    columns = ", ".join(f"c{i}" for i in range(router.MAX_PARSE_CHARS // 4))
    big_select = f"SELECT {columns} FROM t"
    s = one(big_select)
    assert not s.parsed and not s.read_only
    huge = "INSERT INTO t VALUES " + ",".join("(1)" for _ in range(router.MAX_CLASSIFY_CHARS // 3))
    c = classify(huge)
    assert c.statements == (Statement(parsed=False),)


# ------------------------------------------------------------------------------------ batches


def test_multi_statement_order_and_summaries():
    c = classify(
        "BEGIN; SET LOCAL statement_timeout = '1s'; SELECT * FROM t FOR UPDATE; "
        "UPDATE t SET a = 1; COMMIT;"
    )
    assert [s.transaction for s in c.statements] == ["begin", None, None, None, "commit"]
    assert c.transaction_control == ("begin", "commit")
    assert not c.read_only
    assert c.parsed
    assert not c.has_session_effects


def test_multi_statement_all_read_only():
    c = classify("SELECT 1; SELECT 2;\nSHOW search_path")
    assert len(c.statements) == 3
    assert c.read_only
    assert classify("SELECT 1; SELECT nextval('s')").read_only is False


def test_asyncpg_reset_query():
    c = classify("SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;")
    unpins = [s.unpins for s in c.statements[:3]]
    assert unpins == [{"advisory_unlock_all"}, {"close_all"}, {"unlisten_all"}]
    assert c.unpins == {"advisory_unlock_all", "close_all", "unlisten_all"}
    assert c.session == (("reset_all",),)
    assert c.has_session_effects


def test_multi_statement_session_effects_in_order():
    c = classify(
        "SET search_path TO a; SELECT set_config('x.y', '1', false); RESET search_path; "
        "LISTEN ch; PREPARE p AS SELECT 1; DISCARD PLANS"
    )
    assert c.session == (
        ("set", "search_path", "a"),
        ("set_config", "x.y", "1"),
        ("reset", "search_path"),
    )
    assert c.pins == {"listen"}
    assert c.prepared == (("prepare", "p", None, "SELECT 1"),)
    assert c.discards == ("plans",)
    assert c.has_session_effects


def test_semicolons_inside_literals_comments_and_parentheses_do_not_split():
    c = classify("SELECT ';', $$;$$, \"a;b\" FROM t -- ; COMMIT\n/* ; ROLLBACK */")
    assert len(c.statements) == 1 and c.read_only
    c = classify(
        "CREATE RULE r AS ON INSERT TO t DO ALSO "
        "(INSERT INTO a VALUES (1); INSERT INTO b VALUES (2)); COMMIT"
    )
    assert [s.transaction for s in c.statements] == [None, "commit"]


def test_sql_standard_function_body_is_one_statement():
    c = classify(
        "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; "
        "SELECT CASE WHEN true THEN 1 END; END; COMMIT"
    )
    assert [s.transaction for s in c.statements] == [None, "commit"]
    c = classify("CREATE PROCEDURE p() BEGIN ATOMIC INSERT INTO t VALUES (1); END; ROLLBACK")
    assert [s.transaction for s in c.statements] == [None, "rollback"]


def test_one_bad_statement_does_not_hide_the_others():
    c = classify("BEGIN READ ONLY; frobnicate the database; COMMIT")
    assert [s.transaction for s in c.statements] == ["begin_read_only", None, "commit"]
    assert [s.parsed for s in c.statements] == [True, False, True]
    assert not c.parsed


def test_empty_texts():
    for sql in ("", "   ", ";", ";;\n;", "-- just a comment", "/* only */"):
        c = classify(sql)
        assert c.statements == () and not c.read_only and c.parsed, sql


# ------------------------------------------------------------------------------------ hint

HINTS = [
    ("/* gpooler:primary */ SELECT 1", "primary"),
    ("/* gpooler:replica */ SELECT 1", "replica"),
    ("/* gpooler:any */ SELECT 1", "any"),
    ("/*gpooler:replica*/SELECT 1", "replica"),
    ("  \n\t/* gpooler: replica */\nSELECT 1", "replica"),
    ("/* GPOOLER:PRIMARY */ SELECT 1", "primary"),
    ("SELECT 1 /* gpooler:replica */", None),
    ("/* other */ /* gpooler:replica */ SELECT 1", None),
    ("/* gpooler:replicas */ SELECT 1", None),
    ("/* gpooler:somewhere */ SELECT 1", None),
    ("/* gpooler:replica SELECT 1", None),
    ("-- gpooler:replica\nSELECT 1", None),
    ("SELECT '/* gpooler:replica */'", None),
    ("", None),
    ("/", None),
]


@pytest.mark.parametrize("sql, expected", HINTS, ids=ids(HINTS))
def test_hint(sql, expected):
    assert hint(sql) == expected


def test_hint_does_not_change_the_classification():
    assert classify("/* gpooler:replica */ SELECT nextval('s')").read_only is False
    assert classify("/* gpooler:primary */ SELECT 1").read_only is True


# ------------------------------------------------------------------------------------ cache


def test_cached_lookup_returns_the_same_object():
    a = classify("SELECT * FROM t WHERE id = $1")
    b = classify("SELECT * FROM t WHERE id = $1")
    assert a is b
    assert router.cache_info()["entries"] == 1
    assert router.cache_info()["misses"] == 1


def test_cache_is_keyed_by_exact_text():
    assert classify("SELECT 1 FROM t") is not classify("SELECT 1 FROM t ")
    assert classify("SELECT 1 FROM t") == classify("SELECT 1 FROM t ")


def test_set_cache_size_bounds_and_evicts_least_recently_used():
    router.set_cache_size(3)
    texts = [f"SELECT {i} FROM t" for i in range(5)]
    first = classify(texts[0])
    classify(texts[1])
    classify(texts[0])  # touch: texts[1] is now the oldest
    classify(texts[2])
    classify(texts[3])
    info = router.cache_info()
    assert info["entries"] == 3 and info["maxsize"] == 3
    assert classify(texts[0]) is first
    misses = router.cache_info()["misses"]
    classify(texts[1])
    assert router.cache_info()["misses"] == misses + 1
    router.set_cache_size(1)
    assert router.cache_info()["entries"] == 1


def test_cache_size_zero_disables_caching():
    router.set_cache_size(0)
    a = classify("SELECT 2 FROM t")
    assert classify("SELECT 2 FROM t") == a
    assert router.cache_info()["entries"] == 0


def test_clear_cache():
    classify("SELECT 3 FROM t")
    router.clear_cache()
    assert router.cache_info() == {"entries": 0, "maxsize": 10000, "chars": 0, "misses": 0}


@pytest.mark.parametrize("text", sorted(router._TRIVIAL))
def test_prefiltered_texts_agree_with_the_full_classifier(text):
    # a leading space misses the exact-text table and takes the lexer (and sqlglot) path
    assert router._classify_uncached(" " + text) == router._TRIVIAL[text]
    assert classify(text) == router._TRIVIAL[text]


def test_results_are_immutable_and_hashable():
    c = classify("SET search_path TO a; LISTEN ch")
    with pytest.raises(AttributeError):
        c.read_only = True  # type: ignore[misc]
    with pytest.raises(AttributeError):
        c.statements[0].pins = frozenset()  # type: ignore[misc]
    assert hash(c) == hash(classify("SET search_path TO a; LISTEN ch "))
    assert isinstance(c, Classification)


def test_not_a_string_is_unparsed_not_an_exception():
    for value in (None, b"SELECT 1", 42, ["SELECT 1"]):
        c = classify(value)  # type: ignore[arg-type]
        assert not c.parsed and not c.read_only
    assert router.cache_info()["entries"] == 0


# ------------------------------------------------------------------------------------ never raises


def _check_invariants(sql: str) -> None:
    c = classify(sql)
    assert isinstance(c, Classification)
    assert c.read_only == (bool(c.statements) and all(s.read_only for s in c.statements))
    for s in c.statements:
        assert isinstance(s, Statement)
        if not s.parsed:
            assert not s.read_only and s.transaction is None
            assert s.prepared is None and s.discard is None
        if s.read_only:
            assert s.transaction is None and not s.session and not s.pins
    assert classify(sql) is c or len(sql) > router.MAX_CLASSIFY_CHARS
    assert router._classify_uncached(sql) == c


_SQLISH = st.sampled_from(
    [
        "SELECT", "select", "FROM", "WHERE", "WITH", "RECURSIVE", "AS", "INSERT", "INTO", "VALUES",
        "UPDATE", "DELETE", "MERGE", "FOR", "SHARE", "KEY", "NO", "BEGIN", "COMMIT", "ROLLBACK",
        "END", "ATOMIC", "CASE", "TO", "SAVEPOINT", "RELEASE", "SET", "LOCAL", "SESSION", "RESET",
        "ALL", "TIME", "ZONE", "DEFAULT", "PREPARE", "EXECUTE", "DEALLOCATE", "DISCARD", "TEMP",
        "LISTEN", "UNLISTEN", "LOAD", "DECLARE", "CURSOR", "HOLD", "CLOSE", "EXPLAIN", "ANALYZE",
        "CREATE", "FUNCTION", "TABLE", "pg_temp", "nextval", "pg_advisory_lock",
        "pg_advisory_unlock_all", "set_config", "search_path", "t", "x", "1", "-1", "1.5e3", "$1",
        "'str'", "'it''s'", "E'\\''", "$$dollar$$", "$t$x$t$", '"Quoted"', "(", ")", ",", ";", ".",
        "=", "*", "::", "[", "]", "--c\n", "/* c */", "/*", "*/", "'", '"', "$", "\\", "\n", "\x00",
        "\u00e9", "\U0001f600",
    ]
)  # fmt: skip


@FUZZ
@given(st.text(max_size=300))
@example("")
@example("SELECT '\ud800'")
@example("SELECT " + "(" * 300 + "1" + ")" * 300)
@example("WITH " * 200)
@example("/*" * 100)
def test_random_text_never_raises(sql):
    _check_invariants(sql)


@FUZZ
@given(st.lists(_SQLISH, max_size=40).map(" ".join))
def test_sql_token_soup_never_raises(sql):
    _check_invariants(sql)


@FUZZ
@given(st.lists(_SQLISH, max_size=40).map("".join))
def test_glued_token_soup_never_raises(sql):
    _check_invariants(sql)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(READ_ONLY + NOT_READ_ONLY + [c[0] for c in TRANSACTION + SESSION + PINS]),
    st.sampled_from(["", " ", "\n", "-- c\n", "/* c */ ", "/* /* nested */ */ "]),
)
def test_leading_comments_and_whitespace_change_nothing(sql, prefix):
    router.clear_cache()
    assert classify(prefix + sql) == classify(sql)


def test_no_warnings_logged(caplog):
    caplog.set_level(logging.DEBUG)
    tables = TRANSACTION + SESSION + PINS + UNPINS + PREPARED
    texts = READ_ONLY + NOT_READ_ONLY + UNPARSED + [c[0] for c in tables]
    for sql in texts:
        classify(sql)
    loud = [r for r in caplog.records if r.levelno > logging.DEBUG]
    assert not loud, [r.getMessage() for r in loud]
