"""What a SQL text does, as far as pooling and routing care: pure, cached, never raises.

For every simple-protocol Query string and every Parse'd statement text the pooler needs to know
whether it is safe for a read replica, whether it opens or ends a transaction, which session state
it changes (SET, RESET, set_config, PREPARE, DISCARD) and whether it uses a session-only feature
that must keep the server connection (LISTEN, session advisory locks, temp tables, WITH HOLD
cursors, LOAD).

How a text is read:

1. A small Postgres lexer (one regex match per token) splits the text into statements and
   tokens. It knows what the Postgres lexer knows about strings ('', E'', U&'', $tag$...$tag$),
   quoted identifiers and nested /* */ comments, so comments and literals never look like calls or
   keywords. It splits at top-level semicolons only: not inside parentheses (CREATE RULE action
   lists) and not inside CREATE FUNCTION/PROCEDURE ... BEGIN ATOMIC ... END bodies (psql's rule).
2. The statement's leading keyword picks a handler. Utility statements (BEGIN, START TRANSACTION,
   COMMIT, SAVEPOINT, SET, RESET, SHOW, PREPARE, EXECUTE, DEALLOCATE, DISCARD, LISTEN, UNLISTEN,
   LOAD, DECLARE, CLOSE, EXPLAIN ...) are read from tokens: sqlglot either falls back to
   exp.Command for them or, worse, returns a wrong tree (START TRANSACTION -> Alias, ABORT ->
   Column, SAVEPOINT s -> Alias, BEGIN READ ONLY -> ParseError), so its output cannot be trusted
   to say what they are.
3. Queries (SELECT, WITH, VALUES, TABLE, parenthesised SELECT) are parsed with sqlglot (postgres
   dialect) and their tree is walked: data-modifying CTEs, locking clauses, SELECT INTO and calls of
   functions that write or are session-bound make them not read-only.
4. Calls that matter for pinning (session advisory locks and unlocks, set_config with literal
   arguments) are found in the tokens of every statement that executes expressions, so they are
   seen even where sqlglot fails.

Everything is behind an LRU keyed by the exact text: the hot path pays one dict lookup for a text
it has seen (well under a microsecond), and the lexer and sqlglot only run for text seen for the
first time. That first time is not cheap: the lexer takes 10-50 us for a utility statement, and a
sqlglot parse 0.3-1 ms for an ordinary query and about 3 ms per kilobyte beyond, all of it
blocking the gevent hub. Hence MAX_PARSE_CHARS and MAX_CLASSIFY_CHARS: past them the answer is
"not understood", which routes to the primary and pins nothing it did not see.

parsed=False means "do not trust this beyond 'not read-only'". Text Postgres itself would reject
(unknown leading keyword, unterminated literal or comment) yields an empty parsed=False statement;
a query that only sqlglot fails on still carries the pins and set_config effects the lexer found.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import NamedTuple

import sqlglot
from sqlglot import exp

log = logging.getLogger(__name__)

__all__ = [
    "Statement",
    "Classification",
    "classify",
    "hint",
    "set_cache_size",
    "clear_cache",
    "cache_info",
]

_EMPTY: frozenset[str] = frozenset()

# Texts longer than this are not lexed at all (one unparsed statement): the lexer costs about a
# microsecond per token (~30 ms at this size), and a bulk INSERT is never read-only anyway.
MAX_CLASSIFY_CHARS = 64 * 1024
# Query statements longer than this are not handed to sqlglot (parsed=False, so not read-only):
# its parse is pure Python and costs about 3 ms per kilobyte, all of it blocking the hub.
MAX_PARSE_CHARS = 16 * 1024
# The cache keeps at most this many characters of key text, whatever the entry count.
CACHE_CHAR_BUDGET = 32 << 20


# ------------------------------------------------------------------------------------ results


@dataclass(frozen=True, slots=True)
class Statement:
    """One SQL statement, as the pooler needs to see it.

    read_only: safe for a read replica (plain SELECT/VALUES/TABLE/SHOW, WITH ... SELECT, EXPLAIN
        without ANALYZE) with no data-modifying CTE, locking clause, SELECT INTO or call of a
        function known to write or to be session-bound.
    transaction: "begin" | "begin_read_only" | "commit" | "rollback" | "savepoint" | "release" |
        "rollback_to" | "prepare_transaction" | None. COMMIT/ROLLBACK AND CHAIN are "commit" and
        "rollback" (the status byte of ReadyForQuery tells the chained transaction is open).
    session: session-state effects in order: ("set", name, value), ("reset", name),
        ("reset_all",), ("set_config", name, value). Values are the text SHOW would print where
        that is easy (and which set_config(name, value, false) accepts as is).
    prepared: ("prepare", name, param_types_or_None, body), ("execute", name),
        ("deallocate", name), ("deallocate_all",) or None.
    discard: "all" | "plans" | "sequences" | "temp" | None.
    pins: session-only features in use: "listen", "advisory_lock", "temp_table",
        "cursor_with_hold", "load"; "set_config" when set_config(..., false) is called with
        arguments that are not literals (the session changes in a way we cannot replay).
    unpins: what releases them: "unlisten_all", "unlisten", "advisory_unlock_all",
        "advisory_unlock", "close_all", "discard_temp" (DISCARD ALL gives all of
        unlisten_all, advisory_unlock_all, close_all and discard_temp).
    parsed: False when the statement could not be understood (unknown leading keyword, bad shape,
        sqlglot failed on a query, too long to parse); then read_only is False. Calls found by the
        lexer (pins, unpins, set_config) are still reported when the lexer could read the text:
        a spurious pin costs a connection, a missed one leaks a lock to another client.
    """

    read_only: bool = False
    transaction: str | None = None
    session: tuple[tuple, ...] = ()
    prepared: tuple | None = None
    discard: str | None = None
    pins: frozenset[str] = _EMPTY
    unpins: frozenset[str] = _EMPTY
    parsed: bool = True


@dataclass(frozen=True, slots=True)
class Classification:
    """One Query string: its statements in order, and summaries computed once (it is cached).

    read_only: every statement is read_only, and there is at least one.
    parsed: every statement was understood.
    transaction_control: the non-None Statement.transaction values, in order.
    session: all session effects, in order.
    prepared: all prepared-statement operations, in order.
    discards: all DISCARD targets, in order.
    pins / unpins: unions over the statements.
    has_session_effects: any session effect, prepared operation or DISCARD.
    """

    statements: tuple[Statement, ...]
    read_only: bool
    parsed: bool = field(init=False, compare=False)
    transaction_control: tuple[str, ...] = field(init=False, compare=False)
    session: tuple[tuple, ...] = field(init=False, compare=False)
    prepared: tuple[tuple, ...] = field(init=False, compare=False)
    discards: tuple[str, ...] = field(init=False, compare=False)
    pins: frozenset[str] = field(init=False, compare=False)
    unpins: frozenset[str] = field(init=False, compare=False)
    has_session_effects: bool = field(init=False, compare=False)

    def __post_init__(self) -> None:
        sts = self.statements
        put = object.__setattr__
        put(self, "parsed", all(s.parsed for s in sts))
        put(self, "transaction_control", tuple(s.transaction for s in sts if s.transaction))
        put(self, "session", tuple(e for s in sts for e in s.session))
        put(self, "prepared", tuple(s.prepared for s in sts if s.prepared))
        put(self, "discards", tuple(s.discard for s in sts if s.discard))
        put(self, "pins", frozenset().union(*(s.pins for s in sts)) if sts else _EMPTY)
        put(self, "unpins", frozenset().union(*(s.unpins for s in sts)) if sts else _EMPTY)
        put(self, "has_session_effects", bool(self.session or self.prepared or self.discards))


def _classification(statements: tuple[Statement, ...]) -> Classification:
    return Classification(statements, bool(statements) and all(s.read_only for s in statements))


_UNPARSED = Statement(parsed=False)
_UNPARSED_TEXT = Classification((_UNPARSED,), False)


# ------------------------------------------------------------------------------------ lexer


class _Tok(NamedTuple):
    kind: str  # w word (value lowercased), i quoted identifier, s string, n number, p $n, o other
    val: str  # w: lowercased; o: the character(s); otherwise the raw source text
    start: int
    end: int


class _LexError(Exception):
    """An unterminated string, identifier or comment: Postgres rejects the whole text."""


_IDENT_START = "A-Za-z_\x80-\U0010ffff"
_IDENT_CONT = "A-Za-z_0-9\x80-\U0010ffff"
# Alternatives in order of frequency (words, punctuation, numbers first: the regex engine tries
# them in order). A word may not swallow the prefix of E'', B'', X'', N'' or U&'' literals, and
# punctuation may not swallow the start of a comment ('/' is left to the catch-all after them).
_TOKEN_RE = re.compile(
    rf"""[ \t\n\r\f\v]*(?:
      (?P<w>(?![eEbBxXnN]'|[uU]&['"])[{_IDENT_START}][{_IDENT_CONT}$]*)
    | (?P<o>::|[(),.;=*+<>\[\]]|-(?!-))
    | (?P<n>0[xXoObB][0-9A-Fa-f_]+
           |(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][+-]?[0-9]+)?)
    | (?P<s>(?:[bBxXnN]|[uU]&)?'[^']*(?:''[^']*)*')
    | (?P<p>\$[0-9]+)
    | (?P<i>(?:[uU]&)?"[^"]*(?:""[^"]*)*")
    | (?P<es>[eE]'(?:[^'\\]|\\[\s\S]|'')*')
    | (?P<d>\$(?P<tag>(?:[{_IDENT_START}][{_IDENT_CONT}]*)?)\$[\s\S]*?\$(?P=tag)\$)
    | (?P<lc>--[^\n\r]*)
    | (?P<bc>/\*)
    | (?P<x>[^ \t\n\r\f\v])
    )""",
    re.VERBOSE,
)
_BAD_OTHER = frozenset("'\"$")  # a quote or dollar the string alternatives could not close
_new_tok = tuple.__new__  # builds a _Tok in C; _Tok(...) goes through a Python-level __new__


def _lex(sql: str) -> list[_Tok]:
    """Tokens of sql with comments dropped; raises _LexError where Postgres would."""
    toks: list[_Tok] = []
    append = toks.append
    match = _TOKEN_RE.match
    pos = 0
    n = len(sql)
    while True:
        m = match(sql, pos)
        if m is None:
            return toks  # only whitespace is left
        kind = m.lastgroup
        pos = m.end()
        if kind == "w":
            append(_new_tok(_Tok, ("w", m.group(kind).lower(), m.start(kind), pos)))
        elif kind == "o" or kind == "x":
            val = m.group(kind)
            if val in _BAD_OTHER:
                raise _LexError(val)
            append(_new_tok(_Tok, ("o", val, m.start(kind), pos)))
        elif kind == "lc":
            continue
        elif kind == "bc":
            pos = _skip_block_comment(sql, pos, n)
        else:
            start = m.start(kind)
            raw = m.group(kind)
            if kind == "es" or kind == "d":
                kind = "s"
            append(_new_tok(_Tok, (kind, raw, start, pos)))


def _skip_block_comment(sql: str, pos: int, n: int) -> int:
    """Past the */ closing a comment whose /* ends at pos; Postgres nests block comments."""
    depth = 1
    while depth:
        close = sql.find("*/", pos)
        if close < 0:
            raise _LexError("/*")
        opening = sql.find("/*", pos, close)
        if opening >= 0:
            depth += 1
            pos = opening + 2
        else:
            depth -= 1
            pos = close + 2
    return pos


def _split(toks: list[_Tok]) -> list[list[_Tok]]:
    """Statements at top-level semicolons, as the server's grammar (and psql) sees them."""
    out: list[list[_Tok]] = []
    cur: list[_Tok] = []
    paren = 0
    atomic = 0  # BEGIN/CASE ... END nesting inside CREATE FUNCTION/PROCEDURE bodies
    routine = False
    for t in toks:
        kind, val = t.kind, t.val
        if kind == "o":
            if val == ";" and paren == 0 and atomic == 0:
                if cur:
                    out.append(cur)
                cur = []
                routine = False
                continue
            if val == "(":
                paren += 1
            elif val == ")" and paren:
                paren -= 1
        elif kind == "w":
            if routine:
                if val in ("begin", "case"):
                    atomic += 1
                elif val == "end" and atomic:
                    atomic -= 1
            elif val in ("function", "procedure") and cur and cur[0].val == "create":
                routine = all(x.val in ("or", "replace") for x in cur[1:])
        cur.append(t)
    if cur:
        out.append(cur)
    return out


# ------------------------------------------------------------------------------------ literals

_E_ESCAPE_RE = re.compile(
    r"''|\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|u([0-9A-Fa-f]{4})|U([0-9A-Fa-f]{8})|([\s\S]))"
)
_E_SIMPLE = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _e_unescape(m: re.Match) -> str:
    octal, hx, u4, u8, other = m.groups()
    try:
        if octal:
            return chr(int(octal, 8))
        if hx:
            return chr(int(hx, 16))
        if u4 or u8:
            return chr(int(u4 or u8, 16))
    except ValueError:
        return m.group(0)
    if other is None:
        return "'"  # ''
    return _E_SIMPLE.get(other, other)


def _string_value(raw: str) -> str:
    """The value of a string literal token as Postgres reads it (standard_conforming_strings on)."""
    if raw[0] == "$":
        tag_end = raw.index("$", 1) + 1
        return raw[tag_end:-tag_end]
    if raw[0] in "eE":
        return _E_ESCAPE_RE.sub(_e_unescape, raw[2:-1])
    body = raw[raw.index("'") + 1 : -1]
    return body.replace("''", "'")


def _ident_value(t: _Tok) -> str | None:
    """A name token as Postgres resolves it: unquoted folded to lower case, quoted kept."""
    if t.kind == "w":
        return t.val
    if t.kind == "i":
        raw = t.val
        return raw[raw.index('"') + 1 : -1].replace('""', '"')
    return None


_SAFE_IDENT_RE = re.compile(r"[a-z_][a-z0-9_]*\Z")


def _quote_ident(name: str) -> str:
    """Postgres quote_identifier without the keyword list: enough for list GUCs to replay."""
    if _SAFE_IDENT_RE.match(name):
        return name
    return '"' + name.replace('"', '""') + '"'


# ------------------------------------------------------------------------------------ calls

# Session-level advisory locks pin; their _xact_ variants end with the transaction and do not.
_ADVISORY_SESSION_LOCKS = frozenset(
    ("pg_advisory_lock", "pg_advisory_lock_shared",
     "pg_try_advisory_lock", "pg_try_advisory_lock_shared")
)
_ADVISORY_UNLOCKS = frozenset(("pg_advisory_unlock", "pg_advisory_unlock_shared"))

# Functions that write, or whose result depends on this session, so a replica must not run them.
_WRITE_FUNCS = frozenset(
    (
        "nextval", "setval", "currval", "lastval", "setseed", "set_config", "pg_notify",
        "txid_current", "txid_current_if_assigned", "pg_current_xact_id",
        "pg_current_xact_id_if_assigned", "pg_listening_channels", "pg_export_snapshot",
        "pg_cancel_backend", "pg_terminate_backend", "pg_reload_conf", "pg_rotate_logfile",
        "pg_switch_wal", "pg_create_restore_point", "pg_promote", "pg_backup_start",
        "pg_backup_stop", "pg_start_backup", "pg_stop_backup", "pg_drop_replication_slot",
        "pg_replication_slot_advance", "pg_import_system_collations", "pg_file_write",
        "pg_file_rename", "pg_file_unlink", "pg_file_sync", "pg_log_backend_memory_contexts",
    )
)  # fmt: skip
_WRITE_PREFIXES = (
    "pg_advisory_", "pg_try_advisory_", "lo_", "dblink", "pg_create_", "pg_copy_",
    "pg_logical_", "pg_replication_origin_", "pg_stat_reset", "pg_wal_replay_",
)  # fmt: skip


def _writes(name: str) -> bool:
    return name in _WRITE_FUNCS or name.startswith(_WRITE_PREFIXES)


_FALSE_WORDS = frozenset(("false", "off", "f", "no", "n", "0"))
_TRUE_WORDS = frozenset(("true", "on", "t", "yes", "y", "1"))


def _literal_bool(t: _Tok) -> bool | None:
    if t.kind == "w" or t.kind == "n":
        v = t.val.lower()
    elif t.kind == "s":
        v = _string_value(t.val).strip().lower()
    else:
        return None
    return False if v in _FALSE_WORDS else True if v in _TRUE_WORDS else None


def _call_args(toks: list[_Tok], i: int) -> list[list[_Tok]] | None:
    """Arguments of a call whose '(' is at toks[i], split at top-level commas."""
    args: list[list[_Tok]] = [[]]
    depth = 0
    for t in toks[i + 1 :]:
        if t.kind == "o":
            if t.val == "(":
                depth += 1
            elif t.val == ")":
                if depth == 0:
                    return args if args != [[]] else []
                depth -= 1
            elif t.val == "," and depth == 0:
                args.append([])
                continue
        args[-1].append(t)
    return None


class _Calls(NamedTuple):
    pins: frozenset[str]
    unpins: frozenset[str]
    session: tuple[tuple, ...]


_NO_CALLS = _Calls(_EMPTY, _EMPTY, ())


def _scan_calls(toks: list[_Tok]) -> _Calls:
    """Advisory locks, unlocks and set_config calls: a name token directly followed by '('."""
    pins: set[str] = set()
    unpins: set[str] = set()
    session: list[tuple] = []
    last = len(toks) - 1
    for i, t in enumerate(toks):
        if i == last or t.kind not in ("w", "i"):
            continue
        paren = toks[i + 1]
        if paren.kind != "o" or paren.val != "(":
            continue
        name = _ident_value(t)
        if name in _ADVISORY_SESSION_LOCKS:
            pins.add("advisory_lock")
        elif name in _ADVISORY_UNLOCKS:
            unpins.add("advisory_unlock")
        elif name == "pg_advisory_unlock_all":
            unpins.add("advisory_unlock_all")
        elif name == "set_config":
            args = _call_args(toks, i + 1)
            if not args or len(args) != 3:
                continue
            is_local = _literal_bool(args[2][0]) if len(args[2]) == 1 else None
            if is_local is True:
                continue
            if (
                is_local is False
                and len(args[0]) == 1 and args[0][0].kind == "s"
                and len(args[1]) == 1 and args[1][0].kind == "s"
            ):  # fmt: skip
                name = _string_value(args[0][0].val).lower()
                session.append(("set_config", name, _string_value(args[1][0].val)))
            else:
                pins.add("set_config")
    if not (pins or unpins or session):
        return _NO_CALLS
    return _Calls(frozenset(pins), frozenset(unpins), tuple(session))


# ------------------------------------------------------------------------------------ statements


def _words(toks: list[_Tok], start: int = 0, count: int = 8) -> list[str | None]:
    """Lowercased words from toks[start:], None for tokens that are not words; padded with None."""
    out = [t.val if t.kind == "w" else None for t in toks[start : start + count]]
    return out + [None] * (count - len(out))


def _stmt(calls: _Calls = _NO_CALLS, **kw) -> Statement:
    if calls is _NO_CALLS:
        return Statement(**kw)
    kw["pins"] = kw.get("pins", _EMPTY) | calls.pins
    kw["unpins"] = kw.get("unpins", _EMPTY) | calls.unpins
    kw["session"] = kw.get("session", ()) + calls.session
    return Statement(**kw)


def _tx_modes_read_only(toks: list[_Tok], start: int) -> bool | None:
    """READ ONLY / READ WRITE in a transaction mode list: the last one given, else None."""
    mode = None
    for i in range(start, len(toks) - 1):
        if toks[i].kind == "w" and toks[i].val == "read" and toks[i + 1].kind == "w":
            if toks[i + 1].val == "only":
                mode = True
            elif toks[i + 1].val == "write":
                mode = False
    return mode


def _begin(toks: list[_Tok], text: str) -> Statement | None:
    w = _words(toks, 0, 2)
    if w[0] == "start" and w[1] != "transaction":
        return None
    read_only = _tx_modes_read_only(toks, 1)
    return Statement(transaction="begin_read_only" if read_only else "begin")


def _commit(toks: list[_Tok], text: str) -> Statement | None:
    if _words(toks, 1, 1)[0] == "prepared":
        return Statement()  # COMMIT PREPARED 'gid' finishes a two-phase transaction, not ours
    return Statement(transaction="commit")


def _rollback(toks: list[_Tok], text: str) -> Statement | None:
    w = _words(toks, 1, 2)
    if w[0] == "prepared":
        return Statement()
    if w[0] == "to" or (w[0] in ("work", "transaction") and w[1] == "to"):
        return Statement(transaction="rollback_to")
    return Statement(transaction="rollback")


def _savepoint(toks: list[_Tok], text: str) -> Statement | None:
    return Statement(transaction="savepoint") if len(toks) >= 2 else None


def _release(toks: list[_Tok], text: str) -> Statement | None:
    return Statement(transaction="release") if len(toks) >= 2 else None


def _prepare(toks: list[_Tok], text: str) -> Statement | None:
    if len(toks) < 2:
        return None
    if toks[1].kind == "w" and toks[1].val == "transaction":
        return Statement(transaction="prepare_transaction")
    name = _ident_value(toks[1])
    if name is None:
        return None
    i = 2
    types = None
    if i < len(toks) and toks[i].kind == "o" and toks[i].val == "(":
        depth = 0
        for j in range(i, len(toks)):
            if toks[j].kind == "o" and toks[j].val in "()":
                depth += 1 if toks[j].val == "(" else -1
                if depth == 0:
                    break
        else:
            return None
        types = text[toks[i].end : toks[j].start].strip() or None
        i = j + 1
    if i + 1 >= len(toks) or toks[i].kind != "w" or toks[i].val != "as":
        return None
    body = text[toks[i + 1].start : toks[-1].end]
    return Statement(prepared=("prepare", name, types, body))


def _execute(toks: list[_Tok], text: str) -> Statement | None:
    name = _ident_value(toks[1]) if len(toks) >= 2 else None
    if name is None:
        return None
    return _stmt(_scan_calls(toks), prepared=("execute", name))


def _deallocate(toks: list[_Tok], text: str) -> Statement | None:
    i = 2 if _words(toks, 1, 1)[0] == "prepare" and len(toks) > 2 else 1
    if len(toks) != i + 1:
        return None
    if toks[i].kind == "w" and toks[i].val == "all":
        return Statement(prepared=("deallocate_all",))
    name = _ident_value(toks[i])
    return None if name is None else Statement(prepared=("deallocate", name))


_DISCARD = {
    "all": "all", "plans": "plans", "sequences": "sequences", "temp": "temp", "temporary": "temp",
}  # fmt: skip
# DISCARD ALL is CLOSE ALL, UNLISTEN *, pg_advisory_unlock_all(), DISCARD TEMP and more.
_DISCARD_ALL_UNPINS = frozenset(
    ("discard_temp", "unlisten_all", "advisory_unlock_all", "close_all")
)


def _discard(toks: list[_Tok], text: str) -> Statement | None:
    target = _DISCARD.get(_words(toks, 1, 1)[0]) if len(toks) == 2 else None
    if target is None:
        return None
    if target == "all":
        return Statement(discard="all", unpins=_DISCARD_ALL_UNPINS)
    if target == "temp":
        return Statement(discard="temp", unpins=frozenset(("discard_temp",)))
    return Statement(discard=target)


def _listen(toks: list[_Tok], text: str) -> Statement | None:
    if len(toks) != 2 or _ident_value(toks[1]) is None:
        return None
    return Statement(pins=frozenset(("listen",)))


def _unlisten(toks: list[_Tok], text: str) -> Statement | None:
    if len(toks) != 2:
        return None
    if toks[1].kind == "o" and toks[1].val == "*":
        return Statement(unpins=frozenset(("unlisten_all",)))
    if _ident_value(toks[1]) is None:
        return None
    return Statement(unpins=frozenset(("unlisten",)))


def _load(toks: list[_Tok], text: str) -> Statement | None:
    if len(toks) != 2 or toks[1].kind != "s":
        return None
    return Statement(pins=frozenset(("load",)))


def _declare(toks: list[_Tok], text: str) -> Statement | None:
    # DECLARE name [BINARY] [ASENSITIVE|INSENSITIVE] [[NO] SCROLL] CURSOR [WITH[OUT] HOLD] FOR query
    hold = False
    for i in range(2, len(toks) - 1):
        t = toks[i]
        if t.kind == "w" and t.val == "for":
            break
        if t.kind == "w" and t.val == "with" and toks[i + 1][:2] == ("w", "hold"):
            hold = True
    else:
        return None
    return _stmt(_scan_calls(toks), pins=frozenset(("cursor_with_hold",)) if hold else _EMPTY)


def _close(toks: list[_Tok], text: str) -> Statement | None:
    if len(toks) != 2:
        return None
    if toks[1].kind == "w" and toks[1].val == "all":
        return Statement(unpins=frozenset(("close_all",)))
    return Statement() if _ident_value(toks[1]) is not None else None


def _show(toks: list[_Tok], text: str) -> Statement | None:
    return Statement(read_only=True) if len(toks) >= 2 else None


# --- SET / RESET

# GUCs flagged GUC_LIST_QUOTE: Postgres quotes each element of their value with quote_identifier.
_LIST_QUOTE_GUCS = frozenset(
    ("search_path", "temp_tablespaces", "session_preload_libraries", "local_preload_libraries")
)


def _guc_name(toks: list[_Tok], i: int) -> tuple[str | None, int]:
    """A possibly dotted GUC name at toks[i], lowercased; and the index past it."""
    parts = []
    while i < len(toks):
        part = _ident_value(toks[i])
        if part is None:
            return None, i
        parts.append(part.lower())
        i += 1
        if i < len(toks) and toks[i].kind == "o" and toks[i].val == ".":
            i += 1
            continue
        break
    return (".".join(parts) if parts else None), i


def _set_value(toks: list[_Tok], text: str, name: str) -> str | None:
    """The text Postgres stores for SET name TO <toks>; None for DEFAULT."""
    if len(toks) == 1 and toks[0].kind == "w" and toks[0].val == "default":
        return None
    items: list[str] = []
    cur: list[_Tok] = []
    for t in toks + [_Tok("o", ",", -1, -1)]:
        if t.kind == "o" and t.val == ",":
            if not cur:
                return _raw(toks, text)
            if len(cur) == 1 and cur[0].kind in ("w", "i", "s", "n"):
                t0 = cur[0]
                if t0.kind == "w":
                    item = t0.val
                elif t0.kind == "i":
                    item = _ident_value(t0) or ""
                elif t0.kind == "s":
                    item = _string_value(t0.val)
                else:
                    item = t0.val
                if name in _LIST_QUOTE_GUCS and t0.kind != "n":
                    item = _quote_ident(item)
            elif len(cur) == 2 and cur[0].kind == "o" and cur[0].val in "+-" and cur[1].kind == "n":
                item = (cur[0].val if cur[0].val == "-" else "") + cur[1].val
            else:
                return _raw(toks, text)
            items.append(item)
            cur = []
        else:
            cur.append(t)
    return ", ".join(items)


def _raw(toks: list[_Tok], text: str) -> str:
    return text[toks[0].start : toks[-1].end] if toks else ""


_ISOLATION = {
    ("serializable",): "serializable",
    ("repeatable", "read"): "repeatable read",
    ("read", "committed"): "read committed",
    ("read", "uncommitted"): "read uncommitted",
}


def _characteristics(toks: list[_Tok], i: int) -> tuple[tuple, ...]:
    """SET SESSION CHARACTERISTICS AS TRANSACTION <modes> as default_transaction_* settings."""
    w = [t.val if t.kind == "w" else None for t in toks[i:]]
    out: list[tuple] = []
    j = 0
    while j < len(w):
        if w[j] == "isolation" and j + 2 < len(w) and w[j + 1] == "level":
            for words, level in _ISOLATION.items():
                if tuple(w[j + 2 : j + 2 + len(words)]) == words:
                    out.append(("set", "default_transaction_isolation", level))
                    j += 2 + len(words)
                    break
            else:
                j += 1
            continue
        if w[j] == "read" and j + 1 < len(w) and w[j + 1] in ("only", "write"):
            value = "on" if w[j + 1] == "only" else "off"
            out.append(("set", "default_transaction_read_only", value))
            j += 2
            continue
        if w[j] == "not" and j + 1 < len(w) and w[j + 1] == "deferrable":
            out.append(("set", "default_transaction_deferrable", "off"))
            j += 2
            continue
        if w[j] == "deferrable":
            out.append(("set", "default_transaction_deferrable", "on"))
        j += 1
    return tuple(out)


def _set_or_reset(name: str, value_toks: list[_Tok], text: str) -> tuple:
    value = _set_value(value_toks, text, name)
    return ("reset", name) if value is None else ("set", name, value)


def _set(toks: list[_Tok], text: str) -> Statement | None:
    w = _words(toks, 1, 4)
    i = 1
    local = False
    if w[0] == "local":
        local, i = True, 2
    elif w[0] == "session" and w[1] not in ("authorization", "characteristics"):
        i = 2
    w = _words(toks, i, 4)
    rest = toks[i:]
    if not rest:
        return None
    effect: tuple[tuple, ...]
    if w[0] in ("transaction", "constraints"):
        effect = ()  # SET TRANSACTION [SNAPSHOT], SET CONSTRAINTS: this transaction only
    elif w[0] == "time" and w[1] == "zone":
        vt = toks[i + 2 :]
        if not vt:
            return None
        if len(vt) == 1 and vt[0].kind == "w" and vt[0].val in ("local", "default"):
            effect = (("reset", "timezone"),)
        else:
            effect = (_set_or_reset("timezone", vt, text),)
    elif w[0] == "session" and w[1] == "characteristics":
        effect = _characteristics(toks, i + 2)
    elif w[0] == "session" and w[1] == "authorization":
        vt = toks[i + 2 :]
        if not vt:
            return None
        effect = (_set_or_reset("session_authorization", vt, text),)
    elif w[0] == "role" and len(rest) == 2:
        effect = (_set_or_reset("role", rest[1:], text),)
    elif w[0] == "names" and len(rest) == 2:
        effect = (_set_or_reset("client_encoding", rest[1:], text),)
    elif w[0] == "schema" and len(rest) == 2 and rest[1].kind == "s":
        effect = (("set", "search_path", _quote_ident(_string_value(rest[1].val))),)
    elif w[0] == "xml" and w[1] == "option" and w[2] in ("document", "content"):
        effect = (("set", "xmloption", w[2]),)
    elif w[0] == "catalog":
        effect = ()
    else:
        name, j = _guc_name(toks, i)
        if name is None or j >= len(toks):
            return None
        sep = toks[j]
        if sep.kind == "w" and sep.val == "from" and _words(toks, j + 1, 1)[0] == "current":
            effect = ()
        elif (sep.kind == "w" and sep.val == "to") or (sep.kind == "o" and sep.val == "="):
            if j + 1 >= len(toks):
                return None
            effect = (_set_or_reset(name, toks[j + 1 :], text),)
        else:
            return None
    return Statement(session=() if local else effect)


def _reset(toks: list[_Tok], text: str) -> Statement | None:
    w = _words(toks, 1, 3)
    if w[0] == "all" and len(toks) == 2:
        return Statement(session=(("reset_all",),))
    if w[0] == "time" and w[1] == "zone":
        return Statement(session=(("reset", "timezone"),))
    if w[0] == "session" and w[1] == "authorization":
        return Statement(session=(("reset", "session_authorization"),))
    if w[0] == "transaction":
        return Statement()  # RESET TRANSACTION ISOLATION LEVEL: this transaction only
    name, j = _guc_name(toks, 1)
    if name is None or j != len(toks):
        return None
    return Statement(session=(("reset", name),))


# --- CREATE

_TEMP_SCHEMA_RE = re.compile(r"pg_temp(?:_[0-9]+)?\Z")


def _is_temp_schema(name: str) -> bool:
    """pg_temp or pg_temp_NNN: what is created there lives as long as the session."""
    return _TEMP_SCHEMA_RE.match(name) is not None


_CREATE_MODIFIERS = frozenset(
    ("or", "replace", "global", "local", "temp", "temporary", "unlogged", "recursive")
)


def _create(toks: list[_Tok], text: str) -> Statement | None:
    i = 1
    temp = False
    while i < len(toks) and toks[i].kind == "w" and toks[i].val in _CREATE_MODIFIERS:
        temp = temp or toks[i].val in ("temp", "temporary")
        i += 1
    if i >= len(toks):
        return None
    kind = toks[i].val if toks[i].kind == "w" else None
    if kind is None:
        return None
    temp = temp or any(
        t.kind in ("w", "i") and _is_temp_schema(_ident_value(t)) and k + 1 < len(toks)
        and toks[k + 1].kind == "o" and toks[k + 1].val == "."
        for k, t in enumerate(toks)
    )  # fmt: skip
    pins = frozenset(("temp_table",)) if temp else _EMPTY
    # CREATE TABLE ... AS and CREATE MATERIALIZED VIEW run their query now; other CREATEs store
    # code (functions, views, rules) that runs later, so calls in them are not made here.
    executes = kind in ("table", "materialized")
    return _stmt(_scan_calls(toks) if executes else _NO_CALLS, pins=pins)


# --- EXPLAIN

_EXPLAIN_OFF = frozenset(("false", "off", "0"))


def _explain(toks: list[_Tok], text: str) -> Statement | None:
    i = 1
    analyze = False
    if i < len(toks) and toks[i].kind == "o" and toks[i].val == "(":
        i += 1
        opt: list[_Tok] = []
        while i < len(toks):
            t = toks[i]
            i += 1
            if t.kind == "o" and t.val in ",)":
                if opt and opt[0].kind == "w" and opt[0].val in ("analyze", "analyse"):
                    value = opt[1] if len(opt) > 1 else None  # ANALYZE alone means true
                    if value is not None and value.kind == "s":
                        analyze = _string_value(value.val).lower() not in _EXPLAIN_OFF
                    else:
                        analyze = value is None or value.val.lower() not in _EXPLAIN_OFF
                opt = []
                if t.val == ")":
                    break
            else:
                opt.append(t)
        else:
            return None
    else:
        for word in ("analyze", "analyse", "verbose"):
            if i < len(toks) and toks[i].kind == "w" and toks[i].val == word:
                analyze = analyze or word != "verbose"
                i += 1
    inner_toks = toks[i:]
    if not inner_toks:
        return None
    if analyze:
        inner = _statement(inner_toks, text)
        return Statement(
            read_only=inner.read_only,
            session=inner.session,
            prepared=inner.prepared,
            pins=inner.pins,
            unpins=inner.unpins,
            parsed=inner.parsed,
        )
    if inner_toks[0].kind == "w" and inner_toks[0].val == "execute":
        inner = _execute(inner_toks, text)  # EXPLAIN EXECUTE p needs p on this connection
        return Statement(read_only=True, prepared=inner.prepared) if inner else None
    return Statement(read_only=True)


# --- queries: sqlglot

_PG = sqlglot.Dialect.get_or_raise("postgres")
_QUERY_TOPS = (exp.Select, exp.SetOperation, exp.Values, exp.Subquery)
_DML_TOPS = (exp.Insert, exp.Update, exp.Delete, exp.Merge)
_NOT_READ_ONLY_NODES = (
    exp.Insert, exp.Update, exp.Delete, exp.Merge, exp.Lock, exp.Into,
    exp.Create, exp.Drop, exp.Alter, exp.Command, exp.TruncateTable,
)  # fmt: skip


def _func_name(node: exp.Func) -> str:
    if isinstance(node, exp.Anonymous):
        this = node.this
        return (this.this if isinstance(this, exp.Identifier) else str(this)).lower()
    return node.sql_name().lower()


_LOCK_STRENGTH = frozenset(("update", "share", "no", "key"))


def _locks_or_into(toks: list[_Tok]) -> bool:
    """FOR UPDATE/NO KEY UPDATE/SHARE/KEY SHARE or INTO in the tokens: a net under the tree walk.

    INTO is reserved, so in a query it can only be SELECT INTO (or a DML CTE's INSERT/MERGE INTO);
    FOR followed by those words is a locking clause (or, rarely, substring(x FOR key) with a
    column named key: a false "not read-only", the safe direction).
    """
    prev = None
    for t in toks:
        if t.kind == "w":
            if t.val == "into" or (prev == "for" and t.val in _LOCK_STRENGTH):
                return True
            prev = t.val
        else:
            prev = None
    return False


def _query(toks: list[_Tok], text: str) -> Statement:
    calls = _scan_calls(toks)
    sql = text[toks[0].start : toks[-1].end]
    if len(sql) > MAX_PARSE_CHARS:
        return _stmt(calls, parsed=False)
    try:
        trees = _PG.parse(sql)
    except Exception as e:  # ParseError, TokenError, RecursionError on deep nesting, sqlglot bugs
        log.debug("router: sqlglot could not parse %.80r: %s", sql, type(e).__name__)
        return _stmt(calls, parsed=False)
    if len(trees) != 1 or trees[0] is None:
        return _stmt(calls, parsed=False)
    tree = trees[0]
    if isinstance(tree, _DML_TOPS):  # WITH ... INSERT/UPDATE/DELETE/MERGE
        return _stmt(calls)
    if not isinstance(tree, _QUERY_TOPS):
        return _stmt(calls, parsed=False)
    read_only = not _locks_or_into(toks)
    temp = False
    for node in tree.walk():
        if isinstance(node, _NOT_READ_ONLY_NODES):
            read_only = False
            if isinstance(node, exp.Into):
                table = node.this
                db = table.args.get("db") if isinstance(table, exp.Table) else None
                if node.args.get("temporary") or (db is not None and _is_temp_schema(db.name)):
                    temp = True
        elif isinstance(node, exp.Func) and _writes(_func_name(node)):
            read_only = False
    return _stmt(calls, read_only=read_only, pins=frozenset(("temp_table",)) if temp else _EMPTY)


def _other(toks: list[_Tok], text: str) -> Statement:
    """Statements that execute expressions but are never read-only: DML, CALL, COPY ..."""
    return _stmt(_scan_calls(toks))


def _plain(toks: list[_Tok], text: str) -> Statement:
    """Recognised statements with no effect the pooler tracks (DDL, VACUUM, GRANT ...)."""
    return Statement()


_HANDLERS = {
    "begin": _begin,
    "start": _begin,
    "commit": _commit,
    "end": _commit,
    "rollback": _rollback,
    "abort": _rollback,
    "savepoint": _savepoint,
    "release": _release,
    "prepare": _prepare,
    "execute": _execute,
    "deallocate": _deallocate,
    "discard": _discard,
    "listen": _listen,
    "unlisten": _unlisten,
    "load": _load,
    "declare": _declare,
    "close": _close,
    "show": _show,
    "set": _set,
    "reset": _reset,
    "create": _create,
    "explain": _explain,
    "select": _query,
    "with": _query,
    "values": _query,
    "table": _query,
    "(": _query,
    **dict.fromkeys(
        (
            "insert", "update", "delete", "merge", "call", "copy", "do", "lock", "fetch", "move",
            "notify",
        ),
        _other,
    ),
    **dict.fromkeys(
        (
            "alter", "analyze", "analyse", "checkpoint", "cluster", "comment", "drop", "grant",
            "import", "reassign", "refresh", "reindex", "revoke", "security", "truncate", "vacuum",
        ),
        _plain,
    ),
}  # fmt: skip


def _statement(toks: list[_Tok], text: str) -> Statement:
    """One statement from its tokens; never raises."""
    first = toks[0]
    handler = _HANDLERS.get(first.val) if first.kind in ("w", "o") else None
    if handler is None:
        return _UNPARSED
    try:
        st = handler(toks, text)
    except Exception as e:  # a handler bug must cost a conservative answer, not a client
        log.debug("router: handler %s failed: %r", handler.__name__, e)
        return _UNPARSED
    return _UNPARSED if st is None else st


# ------------------------------------------------------------------------------------ entry points


# Exact texts drivers send all the time, answered without the lexer or sqlglot. Tiny on purpose;
# tests check each against the full classifier.
_TRIVIAL: dict[str, Classification] = {}
for _text, _st in (
    ("BEGIN", Statement(transaction="begin")),
    ("COMMIT", Statement(transaction="commit")),
    ("ROLLBACK", Statement(transaction="rollback")),
    ("SELECT 1", Statement(read_only=True)),
):
    for _variant in (_text, _text.lower()):
        _TRIVIAL[_variant] = _TRIVIAL[_variant + ";"] = _classification((_st,))
del _text, _st, _variant


def _classify_uncached(sql: str) -> Classification:
    """The classifier without the cache; never raises."""
    try:
        pre = _TRIVIAL.get(sql)
        if pre is not None:
            return pre
        if len(sql) > MAX_CLASSIFY_CHARS:
            return _UNPARSED_TEXT
        try:
            toks = _lex(sql)
        except _LexError:
            return _UNPARSED_TEXT
        return _classification(tuple(_statement(st, sql) for st in _split(toks)))
    except Exception as e:  # RecursionError or a bug here: never take a client down
        log.debug("router: classify failed: %r", e)
        return _UNPARSED_TEXT


_cache: OrderedDict[str, Classification] = OrderedDict()
_cache_max = 10000
_cache_chars = 0
_misses = 0


def classify(sql: str) -> Classification:
    """What sql does; never raises. Cached by exact text: a hit is a dict lookup and a move to
    the LRU end, so call it per message without a second thought."""
    try:
        c = _cache[sql]
        _cache.move_to_end(sql)
        return c
    except KeyError:
        pass
    except TypeError:  # not hashable: not a text either
        return _UNPARSED_TEXT
    return _miss(sql)


def _miss(sql: str) -> Classification:
    global _cache_chars, _misses
    c = _classify_uncached(sql)
    if not isinstance(sql, str) or len(sql) > MAX_CLASSIFY_CHARS or _cache_max <= 0:
        return c
    _misses += 1
    if sql not in _cache:
        _cache[sql] = c
        _cache_chars += len(sql)
        while len(_cache) > _cache_max or _cache_chars > CACHE_CHAR_BUDGET:
            old, _ = _cache.popitem(last=False)
            _cache_chars -= len(old)
    return c


def set_cache_size(n: int) -> None:
    """Keep at most n texts (0 disables caching); trims the cache now if it is larger."""
    global _cache_max, _cache_chars
    _cache_max = max(0, int(n))
    while len(_cache) > _cache_max:
        old, _ = _cache.popitem(last=False)
        _cache_chars -= len(old)


def clear_cache() -> None:
    """Forget every cached text (tests and benchmarks)."""
    global _cache_chars, _misses
    _cache.clear()
    _cache_chars = 0
    _misses = 0


def cache_info() -> dict[str, int]:
    """Entries, capacity, characters held and misses since the last clear, for stats and admin."""
    return {"entries": len(_cache), "maxsize": _cache_max, "chars": _cache_chars, "misses": _misses}


_HINT_FIRST = frozenset("/ \t\n\r\f\v")
_HINT_RE = re.compile(
    r"[ \t\n\r\f\v]*/\*[ \t]*gpooler:[ \t]*(primary|replica|any)[ \t]*\*/", re.IGNORECASE
)


def hint(sql: str) -> str | None:
    """The routing hint of a leading /* gpooler:primary|replica|any */ comment, else None.

    Only the very start of the text counts (after whitespace), so a hint costs one failed
    character test for ordinary text and never needs the lexer or sqlglot.
    """
    if not sql or sql[0] not in _HINT_FIRST:
        return None
    m = _HINT_RE.match(sql)
    return m.group(1).lower() if m else None


# A plain SELECT with none of these words is read-only without asking sqlglot: statements that
# carry their values in the text are all different, and a parse for each would cost more than
# the query. Anything else is classified properly (and cached).
_PLAIN_SELECT = re.compile(rb"\s*select\b", re.IGNORECASE)
_MAYBE_WRITES = re.compile(
    rb"(?i)\binto\b|\bfor\s+(?:update|share|no\s+key|key\s+share)\b|nextval|setval|advisory"
    rb"|set_config|\blo_|txid_current|pg_current_xact_id|dblink|pg_notify|;\s*\S"
)
_READ_TRANSACTION = frozenset(("begin_read_only", "commit", "rollback"))
_ANY_TRANSACTION = _READ_TRANSACTION | {"begin"}


def routes_to_reader(text: bytes, any_begin: bool = False) -> bool:
    """May this statement text run on a replica? Reads, and the opening of a READ ONLY transaction
    (any_begin: of any transaction, when the client asked for a replica)."""
    if _PLAIN_SELECT.match(text) and _MAYBE_WRITES.search(text) is None:
        return True
    found = classify(text.decode("utf-8", "replace"))
    allowed = _ANY_TRANSACTION if any_begin else _READ_TRANSACTION
    return bool(found.statements) and all(
        s.read_only or s.transaction in allowed for s in found.statements
    )
