"""pytest-benchmark figures for gpooler.router: cached lookups and first-time classification.

Nothing here asserts a timing: the figures are for `pytest tests/test_router_bench.py
--benchmark-only` (or the normal run, which prints them too). Each benchmarked call classifies the
whole mix below, so per-text figures are the call's time divided by len(MIX); extra_info records
texts per second. Under --benchmark-disable every function runs once and only its result is
checked.
"""

from __future__ import annotations

import pytest

from gpooler import router

# What a pooler sees from a mix of applications: driver chatter, ORM queries, session setup.
MIX = [
    "BEGIN",
    "COMMIT",
    "ROLLBACK",
    "SELECT 1",
    "BEGIN ISOLATION LEVEL READ COMMITTED READ ONLY",
    "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE",
    "START TRANSACTION;",
    "SAVEPOINT _pg3_1",
    "RELEASE SAVEPOINT _pg3_1",
    'ROLLBACK TO SAVEPOINT "s140_x1"',
    "SET search_path TO tenant_1, public",
    "SET statement_timeout = '5s'",
    "SET TIME ZONE 'UTC'",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY",
    "SET LOCAL lock_timeout = '1s'",
    "RESET ALL",
    "SELECT set_config('request.jwt.claims', $1, true)",
    "SELECT set_config('search_path', 'tenant_2', false)",
    "SHOW TRANSACTION ISOLATION LEVEL",
    "select pg_catalog.version()",
    "SELECT current_schema()",
    "DEALLOCATE ALL",
    "DISCARD ALL",
    "LISTEN jobs",
    "UNLISTEN *",
    "SELECT pg_advisory_lock($1)",
    "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;",
    "SELECT pg_try_advisory_xact_lock(hashtext($1))",
    "SELECT nextval('orders_id_seq')",
    "select * from users where id = $1",
    "SELECT u.id, u.name, u.email, o.total FROM users u JOIN orders o ON o.user_id = u.id "
    "WHERE u.id = $1 AND o.created_at > now() - interval '7 days' "
    "ORDER BY o.created_at DESC LIMIT 20",
    'SELECT "auth_user"."id", "auth_user"."password", "auth_user"."last_login", '
    '"auth_user"."is_superuser", "auth_user"."username", "auth_user"."email" '
    'FROM "auth_user" WHERE "auth_user"."username" = $1 LIMIT 21',
    'SELECT "app_item"."id" FROM "app_item" WHERE "app_item"."id" = $1 LIMIT 1 FOR UPDATE',
    "SELECT users.id AS users_id, users.name AS users_name, addresses_1.id AS addresses_1_id "
    "FROM users LEFT OUTER JOIN addresses AS addresses_1 ON users.id = addresses_1.user_id "
    "WHERE users.id = $1",
    "SELECT count(*) AS count_1 FROM (SELECT orders.id AS orders_id FROM orders "
    "WHERE orders.status = $1) AS anon_1",
    "WITH recent AS (SELECT * FROM events WHERE ts > now() - interval '1 hour') "
    "SELECT kind, count(*) FROM recent GROUP BY kind ORDER BY 2 DESC",
    "WITH moved AS (DELETE FROM queue WHERE id = $1 RETURNING *) "
    "INSERT INTO done SELECT * FROM moved",
    "SELECT id, payload FROM jobs WHERE state = 'ready' ORDER BY id LIMIT 10 "
    "FOR UPDATE SKIP LOCKED",
    "INSERT INTO orders (user_id, total, status) VALUES ($1, $2, $3) RETURNING id",
    'INSERT INTO "auth_user" ("password", "username", "email") VALUES ($1, $2, $3) '
    'RETURNING "auth_user"."id"',
    "UPDATE orders SET status = $1, updated_at = now() WHERE id = $2",
    "DELETE FROM sessions WHERE expires_at < now()",
    "INSERT INTO kv (k, v) VALUES ($1, $2) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v",
    "VALUES (1, 'a'), (2, 'b')",
    "PREPARE get_user (int) AS SELECT * FROM users WHERE id = $1",
    "EXECUTE get_user(1)",
    "EXPLAIN SELECT * FROM users WHERE id = 1",
    "CREATE TEMP TABLE scratch (id int) ON COMMIT DROP",
    "DECLARE c CURSOR WITH HOLD FOR SELECT * FROM big",
    "/* gpooler:replica */ SELECT * FROM reports WHERE day = $1",
]


def _classify_mix() -> int:
    classify = router.classify
    read_only = 0
    for sql in MIX:
        read_only += classify(sql).read_only
    return read_only


def _first_time_mix() -> int:
    router.clear_cache()
    return _classify_mix()


@pytest.fixture(autouse=True)
def fresh_cache():
    router.set_cache_size(10000)
    router.clear_cache()
    yield
    router.clear_cache()


def _record(benchmark, name: str) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats:  # absent under --benchmark-disable
        benchmark.extra_info[name] = round(len(MIX) / stats.stats.mean)


def test_mix_is_distinct_and_classifies():
    assert len(set(MIX)) == len(MIX) >= 50
    assert all(router.classify(sql).parsed for sql in MIX)


def test_bench_cached_lookups(benchmark):
    expected = _classify_mix()  # warm the cache
    assert benchmark.pedantic(_classify_mix, rounds=200, iterations=10, warmup_rounds=5) == expected
    assert router.cache_info()["misses"] == len(MIX)  # the benchmark never missed
    _record(benchmark, "lookups_per_second")


def test_bench_first_time_classification(benchmark):
    expected = _first_time_mix()
    assert benchmark.pedantic(_first_time_mix, rounds=5, iterations=1, warmup_rounds=1) == expected
    _record(benchmark, "classifications_per_second")


def test_bench_hint(benchmark):
    def hints() -> int:
        found = 0
        for sql in MIX:
            found += router.hint(sql) is not None
        return found

    assert benchmark.pedantic(hints, rounds=200, iterations=10) == 1
    _record(benchmark, "hints_per_second")
