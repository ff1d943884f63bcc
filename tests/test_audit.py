"""`todo-api db audit`: the live posture for a DBA, failing exactly when the posture check does.

The healthy cases read the shared database; each damaged case breaks a database of its own.
"""

import json
import uuid
from collections.abc import Callable, Iterator
from itertools import takewhile
from typing import Any

import pytest
from psycopg import sql

from service import cli
from service.app import read_posture
from service.db import Database, make_engine
from service.settings import get_settings, sqlalchemy_url
from service.testing import TestDatabase, as_role

POLICIES = ("task_delete", "task_insert", "task_select", "task_update")
SAME_USING = "user_id = (SELECT nullif(current_setting('app.current_user_id', true), ''))"

Audit = Callable[..., tuple[int, str]]


@pytest.fixture
def db_audit(monkeypatch, capsys) -> Iterator[Audit]:
    """Run `todo-api db audit [ARGS]` in-process against a database; exit code and stdout."""

    def run(database: TestDatabase, *args: str, url: str | None = None) -> tuple[int, str]:
        monkeypatch.setenv("DATABASE_URL", url or database.url)
        monkeypatch.setenv("APP_DB_ROLE", database.app_role)
        get_settings.cache_clear()
        try:
            code = cli.main(["db", "audit", *args])
        finally:
            get_settings.cache_clear()
        return code, capsys.readouterr().out

    yield run
    get_settings.cache_clear()


def section(text: str, title: str) -> list[str]:
    """The lines under the heading that starts with `title` (headings are unindented)."""
    lines: list[str] | None = None
    for line in text.splitlines():
        if line and not line.startswith(" "):
            if lines is not None:
                break
            if line.startswith(title):
                lines = []
        elif lines is not None:
            lines.append(line)
    assert lines is not None, f"no section {title!r} in:\n{text}"
    while lines and not lines[-1]:
        lines.pop()
    return lines


def rows(text: str, title: str) -> dict[str, list[str]]:
    """A section's table (its first block of lines), keyed by the first column."""
    table = takewhile(bool, section(text, title))
    return {line.split()[0]: line.split()[1:] for line in table}


def value(text: str, title: str, key: str) -> str:
    """In a section of `key  value` lines, the value of `key`."""
    for line in section(text, title):
        if line.startswith(f"  {key}  "):
            return line.removeprefix(f"  {key}").strip()
    raise AssertionError(f"no {key!r} under {title!r} in:\n{text}")


def catalog_facts(database: TestDatabase) -> tuple[str, str]:
    """The table's owner and the user the service logs in as."""
    with database.connect() as conn:
        row = conn.execute(
            "SELECT pg_get_userbyid(relowner), current_user FROM pg_class "
            "WHERE oid = 'task'::regclass"
        ).fetchone()
    assert row is not None
    return row[0], row[1]


def posture_problems(database: TestDatabase) -> list[str]:
    engine = make_engine(sqlalchemy_url(database.url), database.settings(), pool_size=1)
    db = Database(engine, database.app_role)
    try:
        return read_posture(db).problems
    finally:
        db.dispose()


# --- a healthy database ------------------------------------------------------------------------


def test_healthy_text(database, db_audit):
    code, out = db_audit(database)
    assert code == 0, out
    role = database.app_role
    owner, login = catalog_facts(database)

    assert rows(out, "Row-level security")["task"] == [owner, "yes", "yes", "4"]
    assert "enabled  forced" in section(out, "Row-level security")[0]

    policies = rows(out, "Policies on task")
    for name in POLICIES:
        assert policies[name][1:] == [f"db/policies/{name}.sql", "identical"]
    assert set(policies) == {"policy", *POLICIES}

    attributes = rows(out, f"Application role {role}")["attributes"]
    assert {"NOSUPERUSER", "NOBYPASSRLS", "NOLOGIN"} <= set(attributes)
    assert rows(out, f"Application role {role}")["owns"] == ["nothing"]
    assert login in value(out, f"Application role {role}", "granted to").split(", ")

    privileges = section(out, f"Privileges of {role}")
    assert [line.split() for line in privileges if line.startswith("  table task")] == [
        ["table", "task", "SELECT"],
        ["table", "task", "INSERT", "title,", "description,", "completed,", "user_id"],
        ["table", "task", "UPDATE", "title,", "description,", "completed"],
        ["table", "task", "DELETE"],
    ]
    assert ["schema", "public", "USAGE"] in [line.split() for line in privileges]
    for forbidden in ("TRUNCATE", "TRIGGER", "REFERENCES"):
        assert forbidden not in out

    bypass = rows(out, "Who can get round row-level security")
    assert "owns task" in " ".join(bypass[owner])
    assert login in bypass
    assert role not in bypass

    result = section(out, "Result")
    assert result and all(line.startswith("  OK ") for line in result)


def test_healthy_json_has_the_same_facts(database, db_audit):
    code, out = db_audit(database, "--json")
    assert code == 0, out
    report = json.loads(out)
    owner, login = catalog_facts(database)

    assert report["ok"] is True
    assert report["problems"] == []
    assert report["connected_as"] == login
    task = next(t for t in report["tables"] if t["name"] == "task")
    assert task == {
        "name": "task",
        "owner": owner,
        "rls_enabled": True,
        "rls_forced": True,
        "policies": 4,
    }
    assert {p["name"]: (p["status"], p["file"]) for p in report["policies"]} == {
        name: ("identical", f"db/policies/{name}.sql") for name in POLICIES
    }
    assert all(p["live"] == p["expected"] and p["diff"] == [] for p in report["policies"])

    role = report["app_role"]
    assert role["name"] == database.app_role
    assert (role["exists"], role["superuser"], role["bypassrls"]) == (True, False, False)
    assert {"NOSUPERUSER", "NOBYPASSRLS"} <= set(role["attributes"])
    assert role["owns"] == []
    assert login in role["granted_to"]
    on_task = {
        p["privilege"]: p["columns"]
        for p in role["privileges"]
        if (p["object_type"], p["object_name"]) == ("table", "task")
    }
    assert on_task == {
        "SELECT": [],
        "INSERT": ["title", "description", "completed", "user_id"],
        "UPDATE": ["title", "description", "completed"],
        "DELETE": [],
    }
    assert any(
        (p["object_type"], p["object_name"], p["privilege"]) == ("schema", "public", "USAGE")
        for p in role["privileges"]
    )

    bypass = {b["role"]: b["how"] for b in report["bypassers"]}
    assert "owns task" in bypass[owner]
    assert login in bypass
    assert database.app_role not in bypass


def test_the_same_audit_through_a_least_privilege_login(database, db_audit, login_role):
    """Every catalog read works for a login role that can only switch to the app role."""
    login = login_role
    code, out = db_audit(database, "--json", url=as_role(database.url, login))
    assert code == 0, out
    report = json.loads(out)
    assert report["connected_as"] == login
    assert login in report["app_role"]["granted_to"]
    assert {p["status"] for p in report["policies"]} == {"identical"}
    assert login not in {b["role"] for b in report["bypassers"]}


def test_a_member_of_the_owner_is_listed_but_is_no_failure(fresh_database, db_audit):
    owner, _ = catalog_facts(fresh_database)
    member = f"todo_spare_{uuid.uuid4().hex[:10]}"
    with fresh_database.connect(autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(member)))
        conn.execute(
            sql.SQL("GRANT {} TO {}").format(sql.Identifier(owner), sql.Identifier(member))
        )
    try:
        code, out = db_audit(fresh_database)
    finally:
        with fresh_database.connect(autocommit=True) as conn:
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(member)))
    assert code == 0, out
    assert rows(out, "Who can get round row-level security")[member] == [
        "no",
        "member",
        "of",
        owner,
    ]


# --- damaged databases -------------------------------------------------------------------------

DAMAGE = [
    pytest.param(
        ["ALTER TABLE task NO FORCE ROW LEVEL SECURITY"],
        "row-level security is not forced on task",
        id="rls-not-forced",
    ),
    pytest.param(
        ["ALTER TABLE task DISABLE ROW LEVEL SECURITY"],
        "row-level security is not enabled on task",
        id="rls-disabled",
    ),
    pytest.param(
        ["ALTER POLICY task_select ON task USING (true)"],
        "policy task_select differs from db/policies/",
        id="policy-altered",
    ),
    pytest.param(
        ["DROP POLICY task_delete ON task"],
        "policy task_delete from db/policies/ is missing",
        id="policy-dropped",
    ),
    pytest.param(
        ["CREATE POLICY task_peek ON task FOR SELECT USING (true)"],
        "policy task_peek is not in db/policies/",
        id="extra-policy",
    ),
    pytest.param(
        ["ALTER ROLE {role} BYPASSRLS"],
        "application role {role} has BYPASSRLS",
        id="role-bypassrls",
    ),
    pytest.param(["DROP TABLE task"], "table task does not exist", id="table-dropped"),
    pytest.param(
        ["DROP OWNED BY {role}", "DROP ROLE {role}"],
        "application role {role} does not exist",
        id="role-dropped",
    ),
]


def damage(database: TestDatabase, statements: list[str]) -> None:
    with database.connect(autocommit=True) as conn:
        for statement in statements:
            conn.execute(sql.SQL(statement).format(role=sql.Identifier(database.app_role)))


def named(problems: list[str], problem: str) -> bool:
    return any(p == problem or p.startswith(f"{problem}:") for p in problems)


@pytest.mark.parametrize(("statements", "problem"), DAMAGE)
def test_damage_fails_and_is_named(statements, problem, fresh_database, db_audit):
    damage(fresh_database, statements)
    problem = problem.format(role=fresh_database.app_role)

    code, out = db_audit(fresh_database)
    assert code == 1, out
    result = section(out, "Result")
    assert named([line.removeprefix("  FAIL  ") for line in result], problem), out
    assert not [line for line in result if line.startswith("  OK")]

    code, out = db_audit(fresh_database, "--json")
    assert code == 1
    report = json.loads(out)
    assert report["ok"] is False
    assert named(report["problems"], problem)
    # The audit's verdict is the posture check's, word for word.
    assert report["problems"] == posture_problems(fresh_database)


def test_without_the_table_nothing_is_compared(fresh_database, db_audit):
    damage(fresh_database, ["DROP TABLE task"])
    code, out = db_audit(fresh_database)
    assert code == 1
    assert section(out, "Policies on task") == ["  (not compared: table task does not exist)"]
    assert json.loads(db_audit(fresh_database, "--json")[1])["policies"] is None


def test_not_forced_shows_in_the_table_list(fresh_database, db_audit):
    damage(fresh_database, ["ALTER TABLE task NO FORCE ROW LEVEL SECURITY"])
    code, out = db_audit(fresh_database)
    assert code == 1
    assert rows(out, "Row-level security")["task"][1:] == ["yes", "no", "4"]
    tables = json.loads(db_audit(fresh_database, "--json")[1])["tables"]
    task = next(t for t in tables if t["name"] == "task")
    assert (task["rls_enabled"], task["rls_forced"]) == (True, False)


def policy_row(out: str, name: str) -> list[str]:
    return rows(out, "Policies on task")[name]


def test_altered_policy_shows_a_diff(fresh_database, db_audit):
    damage(fresh_database, ["ALTER POLICY task_select ON task USING (true)"])
    code, out = db_audit(fresh_database)
    assert code == 1
    assert policy_row(out, "task_select") == ["SELECT", "db/policies/task_select.sql", "differs"]
    details = section(out, "Policies on task")
    assert "  --- db/policies/task_select.sql (deparsed)" in details
    assert "  +++ live task_select on task" in details
    assert "  +    USING (true);" in details
    assert [line for line in details if line.startswith("  -    USING ((user_id = ")]
    for other in ("task_insert", "task_update", "task_delete"):
        assert policy_row(out, other)[-1] == "identical"

    report = json.loads(db_audit(fresh_database, "--json")[1])
    select = next(p for p in report["policies"] if p["name"] == "task_select")
    assert select["status"] == "differs"
    assert "+    USING (true);" in select["diff"]
    assert select["live"].endswith("USING (true);")


def test_a_policy_made_restrictive_shows_in_the_diff(fresh_database, db_audit):
    damage(
        fresh_database,
        [
            "DROP POLICY task_delete ON task",
            f"CREATE POLICY task_delete ON task AS RESTRICTIVE FOR DELETE USING ({SAME_USING})",
        ],
    )
    code, out = db_audit(fresh_database)
    assert code == 1
    details = section(out, "Policies on task")
    assert "  -    AS PERMISSIVE" in details
    assert "  +    AS RESTRICTIVE" in details


def test_dropped_policy_shows_its_file(fresh_database, db_audit):
    damage(fresh_database, ["DROP POLICY task_delete ON task"])
    code, out = db_audit(fresh_database)
    assert code == 1
    assert policy_row(out, "task_delete") == ["DELETE", "db/policies/task_delete.sql", "missing"]
    details = section(out, "Policies on task")
    assert "  task_delete is missing; db/policies/task_delete.sql creates:" in details
    assert "    CREATE POLICY task_delete ON task" in details

    report = json.loads(db_audit(fresh_database, "--json")[1])
    dropped = next(p for p in report["policies"] if p["name"] == "task_delete")
    assert (dropped["status"], dropped["file"], dropped["live"]) == (
        "missing",
        "db/policies/task_delete.sql",
        None,
    )


def test_extra_policy_shows_its_live_definition(fresh_database, db_audit):
    damage(fresh_database, ["CREATE POLICY task_peek ON task FOR SELECT USING (true)"])
    code, out = db_audit(fresh_database)
    assert code == 1
    assert policy_row(out, "task_peek") == ["SELECT", "-", "extra"]
    details = section(out, "Policies on task")
    assert "  task_peek is not in db/policies/; live:" in details
    assert "    CREATE POLICY task_peek ON task" in details
    assert "        USING (true);" in details

    report = json.loads(db_audit(fresh_database, "--json")[1])
    extra = next(p for p in report["policies"] if p["name"] == "task_peek")
    assert (extra["status"], extra["file"], extra["expected"]) == ("extra", None, None)


def test_bypassrls_app_role_is_shown_everywhere(fresh_database, db_audit):
    role = fresh_database.app_role
    damage(fresh_database, ["ALTER ROLE {role} BYPASSRLS"])
    code, out = db_audit(fresh_database)
    assert code == 1
    assert "BYPASSRLS" in rows(out, f"Application role {role}")["attributes"]
    assert rows(out, "Who can get round row-level security")[role] == ["no", "BYPASSRLS"]

    report: dict[str, Any] = json.loads(db_audit(fresh_database, "--json")[1])
    assert report["app_role"]["bypassrls"] is True
    assert {"role": role, "login": False, "how": ["BYPASSRLS"]} in report["bypassers"]
