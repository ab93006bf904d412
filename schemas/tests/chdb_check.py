#!/usr/bin/env python3
"""Runs every ClickHouse migration, then every documented query, on current ClickHouse
(chdb-core: the ClickHouse engine in-process). Exit code 0 when all run; otherwise prints the
failing statement and the engine's error. Called by the migrations test (schemas/tests)."""
import pathlib
import re
import sys

root = pathlib.Path(__file__).resolve().parent.parent
try:
    from chdb import session
except ImportError:
    sys.exit("chdb is not installed: run scripts/stack.sh install (pip install chdb-core)")


def statements(sql):
    """Same split as schemas/src/migrate.rs: at `;` ending a line, comment lines dropped."""
    out, cur = [], []
    for line in sql.splitlines():
        t = line.strip()
        if not t or t.startswith("--"):
            continue
        cur.append(line)
        if t.endswith(";"):
            out.append("\n".join(cur).strip().rstrip(";"))
            cur = []
    if "".join(cur).strip():
        out.append("\n".join(cur).strip())
    return out


s = session.Session()
version = s.query("SELECT version()", "TSV").bytes().decode().strip()
s.query("CREATE DATABASE IF NOT EXISTS tollgate_chdb_check")
s.query("USE tollgate_chdb_check")
ran = 0
for path in sorted((root / "migrations").glob("*.sql")) + sorted((root / "queries").glob("*.sql")):
    for stmt in statements(path.read_text()):
        try:
            s.query(stmt, "TSV")
        except Exception as e:  # chdb raises its own error type
            sys.exit(f"{path.name}: failed on ClickHouse {version}:\n{stmt}\n{e}")
        ran += 1
def added_column(stmt):
    """Same rule as schemas/src/migrate.rs: `ALTER TABLE t ADD COLUMN c` is skipped when the
    column exists (ClickHouse 18.16 has no ADD COLUMN IF NOT EXISTS)."""
    w = stmt.split()
    if len(w) >= 6 and [x.upper() for x in (w[0], w[1], w[3], w[4])] == ["ALTER", "TABLE", "ADD", "COLUMN"] and w[5].upper() != "IF":
        return w[2], w[5]
    return None


# Migrations must be re-runnable (IF NOT EXISTS everywhere, or the ADD COLUMN rule).
for path in sorted((root / "migrations").glob("*.sql")):
    for stmt in statements(path.read_text()):
        added = added_column(stmt)
        if added:
            n = s.query(f"SELECT count() FROM system.columns WHERE database = currentDatabase() AND table = '{added[0]}' AND name = '{added[1]}'", "TSV").bytes().decode().strip()
            if n != "1":
                sys.exit(f"{path.name}: column {added} missing after the migration")
            continue
        try:
            s.query(stmt, "TSV")
        except Exception as e:
            sys.exit(f"{path.name}: not idempotent on ClickHouse {version}:\n{stmt}\n{e}")
# Every Grafana panel's SQL, with the data source's time macros expanded.
import json
import time as _time

to = int(_time.time())
frm = to - 3600


def expand(sql):
    sql = sql.replace("$__fromTime", f"toDateTime({frm})").replace("$__toTime", f"toDateTime({to})")
    while "$__timeFilter(" in sql:
        i = sql.index("$__timeFilter(")
        j = sql.index(")", i)
        col = sql[i + len("$__timeFilter("):j].strip()
        sql = sql[:i] + f"{col} >= toDateTime({frm}) AND {col} <= toDateTime({to})" + sql[j + 1:]
    return sql


for path in sorted((root.parent / "dashboards").glob("*.json")):
    for panel in json.loads(path.read_text())["panels"]:
        for target in panel["targets"]:
            sql = expand(target["rawSql"])
            try:
                s.query(sql, "TSV")
            except Exception as e:
                sys.exit(f"{path.name}: panel {panel['title']!r} failed on ClickHouse {version}:\n{sql}\n{e}")
            ran += 1
print(f"ok: {ran} statements on ClickHouse {version}")
