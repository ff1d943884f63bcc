"""The posture check fails closed: every way of weakening row-level security is caught.

Each case damages a database (and application role) of its own as the owner, then shows that
the posture check names the problem, that the app refuses to start, that `/readyz` turns 503
on an app already serving, and that `todo-api db check` exits 1.
"""

import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from alembic import command
from alembic.config import Config
from psycopg import sql

from service import cli
from service.app import UnsafePosture, read_posture
from service.db import Database, make_engine, run_migrations
from service.posture import Posture
from service.settings import PROJECT_ROOT, get_settings, sqlalchemy_url
from service.testing import TestDatabase, app_client, bearer, libpq_url

PROBLEM_JSON = "application/problem+json"


def posture_of(database: TestDatabase) -> Posture:
    settings = database.settings()
    db = Database(
        make_engine(sqlalchemy_url(database.url), settings, pool_size=1), database.app_role
    )
    try:
        return read_posture(db)
    finally:
        db.dispose()


def names(problems: list[str], problem: str) -> bool:
    """Whether one of the problems is `problem` (perhaps followed by a hint what to do)."""
    return any(p == problem or p.startswith(f"{problem}:") for p in problems)


def alembic_config(database: TestDatabase) -> Config:
    config = Config(str(PROJECT_ROOT / "alembic.ini"))
    config.attributes["url"] = database.url
    config.attributes["app_role"] = database.app_role
    return config


@pytest.fixture
def db_check(monkeypatch, capsys) -> Iterator[Callable[[TestDatabase], tuple[int, list[str]]]]:
    """Run `todo-api db check` against a database; its exit code and output lines."""

    def run(database: TestDatabase) -> tuple[int, list[str]]:
        monkeypatch.setenv("DATABASE_URL", database.url)
        monkeypatch.setenv("APP_DB_ROLE", database.app_role)
        get_settings.cache_clear()
        try:
            code = cli.main(["db", "check"])
        finally:
            get_settings.cache_clear()
        return code, capsys.readouterr().out.splitlines()

    yield run
    get_settings.cache_clear()


@pytest.fixture
def spare_role(fresh_database: TestDatabase) -> Iterator[str]:
    """A unique name for roles a case creates (it and `<it>_mid`); dropped afterwards."""
    name = f"todo_spare_{uuid.uuid4().hex[:10]}"
    try:
        yield name
    finally:
        with fresh_database.connect(autocommit=True) as conn:
            roles = conn.execute(
                "SELECT rolname FROM pg_roles WHERE starts_with(rolname, %s) ORDER BY 1 DESC",
                (name,),
            ).fetchall()
            for (role,) in roles:
                conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
                conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


# --- the damage ------------------------------------------------------------------------------

SAME_USING = "user_id = (SELECT nullif(current_setting('app.current_user_id', true), ''))"


@dataclass(frozen=True)
class Damage:
    """SQL run as the owner ({role}: the app role, {spare}: spare_role), and the problem."""

    statements: tuple[str, ...]
    problem: str

    def apply(self, database: TestDatabase, spare: str) -> None:
        identifiers = {
            "role": sql.Identifier(database.app_role),
            "spare": sql.Identifier(spare),
            "spare_mid": sql.Identifier(f"{spare}_mid"),
        }
        with database.connect(autocommit=True) as conn:
            for statement in self.statements:
                conn.execute(sql.SQL(statement).format(**identifiers))

    def expected(self, database: TestDatabase, spare: str) -> str:
        return self.problem.format(role=database.app_role, spare=spare)


class Downgrade(Damage):
    def apply(self, database: TestDatabase, spare: str) -> None:
        command.downgrade(alembic_config(database), "base")


def damage(*statements: str, problem: str) -> Damage:
    return Damage(statements, problem)


DAMAGE = [
    pytest.param(
        damage(
            "ALTER TABLE task DISABLE ROW LEVEL SECURITY",
            problem="row-level security is not enabled on task",
        ),
        id="rls-disabled",
    ),
    pytest.param(
        damage(
            "ALTER TABLE task NO FORCE ROW LEVEL SECURITY",
            problem="row-level security is not forced on task",
        ),
        id="rls-not-forced",
    ),
    *(
        pytest.param(
            damage(
                f"DROP POLICY {name} ON task",
                problem=f"policy {name} from db/policies/ is missing",
            ),
            id=f"policy-{name}-dropped",
        )
        for name in ("task_select", "task_insert", "task_update", "task_delete")
    ),
    pytest.param(
        damage(
            "ALTER POLICY task_select ON task USING (true)",
            problem="policy task_select differs from db/policies/",
        ),
        id="policy-select-using-true",
    ),
    pytest.param(
        damage(
            "ALTER POLICY task_insert ON task WITH CHECK (true)",
            problem="policy task_insert differs from db/policies/",
        ),
        id="policy-insert-check-true",
    ),
    pytest.param(
        damage(
            "DROP POLICY task_update ON task",
            f"CREATE POLICY task_update ON task FOR UPDATE USING ({SAME_USING})",
            problem="policy task_update differs from db/policies/",
        ),
        id="policy-update-without-with-check",
    ),
    pytest.param(
        damage(
            "DROP POLICY task_delete ON task",
            f"CREATE POLICY task_delete ON task AS RESTRICTIVE FOR DELETE USING ({SAME_USING})",
            "CREATE POLICY task_delete_any ON task FOR DELETE USING (true)",
            problem="policy task_delete differs from db/policies/",
        ),
        id="policy-delete-made-restrictive",
    ),
    pytest.param(
        damage(
            "CREATE POLICY task_peek ON task FOR SELECT USING (true)",
            problem="policy task_peek is not in db/policies/",
        ),
        id="extra-policy",
    ),
    pytest.param(
        damage("ALTER ROLE {role} SUPERUSER", problem="application role {role} is a superuser"),
        id="role-superuser",
    ),
    pytest.param(
        damage("ALTER ROLE {role} BYPASSRLS", problem="application role {role} has BYPASSRLS"),
        id="role-bypassrls",
    ),
    pytest.param(
        damage(
            "ALTER TABLE task OWNER TO {role}", problem="application role {role} owns table task"
        ),
        id="role-owns-table",
    ),
    pytest.param(
        damage(
            "CREATE TABLE side_table (id int)",
            "ALTER TABLE side_table OWNER TO {role}",
            problem="application role {role} owns table side_table",
        ),
        id="role-owns-another-table",
    ),
    pytest.param(
        damage(
            "CREATE ROLE {spare} NOLOGIN BYPASSRLS",
            "GRANT {spare} TO {role}",
            problem="application role {role} can act as {spare}",
        ),
        id="role-member-of-bypassrls-role",
    ),
    pytest.param(
        damage(
            "CREATE ROLE {spare} NOLOGIN SUPERUSER",
            "GRANT {spare} TO {role}",
            problem="application role {role} can act as {spare}",
        ),
        id="role-member-of-superuser-role",
    ),
    pytest.param(
        damage(
            "CREATE ROLE {spare} NOLOGIN BYPASSRLS",
            "CREATE ROLE {spare_mid} NOLOGIN",
            "GRANT {spare} TO {spare_mid}",
            "GRANT {spare_mid} TO {role}",
            problem="application role {role} can act as {spare}",
        ),
        id="role-member-of-bypassrls-role-through-another",
    ),
    pytest.param(
        damage(
            "CREATE ROLE {spare} NOLOGIN",
            "ALTER TABLE task OWNER TO {spare}",
            "GRANT {spare} TO {role}",
            problem="application role {role} can act as {spare}",
        ),
        id="role-member-of-table-owner",
    ),
    *(
        pytest.param(
            damage(
                f"GRANT {privilege} ON task TO {{role}}",
                problem=f"application role {{role}} has {privilege} on task",
            ),
            id=f"{privilege.lower()}-granted",
        )
        for privilege in ("TRUNCATE", "TRIGGER", "REFERENCES")
    ),
    pytest.param(
        damage(
            "GRANT TRUNCATE ON task TO PUBLIC",
            problem="application role {role} has TRUNCATE on task",
        ),
        id="truncate-granted-to-public",
    ),
    pytest.param(
        damage("DROP TABLE task", problem="table task does not exist"),
        id="table-dropped",
    ),
    pytest.param(
        Downgrade((), problem="table task does not exist"),
        id="table-downgraded-away",
    ),
    pytest.param(
        damage(
            "DROP OWNED BY {role}",
            "DROP ROLE {role}",
            problem="application role {role} does not exist",
        ),
        id="role-dropped",
    ),
]


@pytest.mark.parametrize("case", DAMAGE)
def test_damaged_posture_fails_closed(case: Damage, fresh_database, spare_role, db_check):
    settings = fresh_database.settings()
    problem = case.expected(fresh_database, spare_role)

    # An app already serving: /readyz turns 503 and names the problem; /healthz does not care.
    with app_client(settings) as client:
        assert client.get("/readyz").status_code == 200
        case.apply(fresh_database, spare_role)
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.headers["content-type"] == PROBLEM_JSON
        assert names(ready.json()["problems"], problem)
        assert client.get("/healthz").status_code == 200

    # (a) The check itself names it.
    assert names(posture_of(fresh_database).problems, problem)

    # (b) The app refuses to start.
    with pytest.raises(UnsafePosture, match=re.escape(problem)), app_client(settings):
        pytest.fail("the app started on a damaged posture")

    # (c) `todo-api db check` fails, one FAIL line per problem, and no OK line.
    code, lines = db_check(fresh_database)
    assert code == 1
    assert names(
        [line.removeprefix("FAIL  ") for line in lines if line.startswith("FAIL")], problem
    )
    assert not [line for line in lines if line.startswith("OK")]


# --- ownership beyond relations (the contract: the app role "owns nothing") ------------------

OWNERSHIP_DAMAGE = [
    # The schema's owner may drop (and recreate) any table in it.
    pytest.param("ALTER SCHEMA public OWNER TO {role}", "DROP TABLE task", id="role-owns-schema"),
    # The trigger function's owner may drop the trigger with it (or, where it may create in the
    # schema, replace code that then runs as whoever updates a task, a superuser included).
    pytest.param(
        "ALTER FUNCTION task_touch() OWNER TO {role}",
        "DROP FUNCTION task_touch() CASCADE",
        id="role-owns-trigger-function",
    ),
]


@pytest.mark.parametrize(("statement", "abuse"), OWNERSHIP_DAMAGE)
def test_app_role_owning_other_objects_fails_closed(statement, abuse, fresh_database, db_check):
    damage(statement, problem="").apply(fresh_database, "unused")

    # The hole is real: acting as the app role, the abuse goes through (then is rolled back).
    with fresh_database.connect() as conn:
        conn.execute("SELECT set_config('role', %s, true)", (fresh_database.app_role,))
        conn.execute(abuse)
        conn.rollback()

    owns = re.compile(rf"application role {fresh_database.app_role} owns ")
    problems = posture_of(fresh_database).problems
    assert [p for p in problems if owns.match(p)], problems
    with pytest.raises(UnsafePosture, match=owns.pattern), app_client(fresh_database.settings()):
        pytest.fail("the app started on a damaged posture")
    code, lines = db_check(fresh_database)
    assert code == 1
    assert [line for line in lines if owns.match(line.removeprefix("FAIL  "))], lines


# --- the healthy posture, and going back and forth -----------------------------------------


def test_healthy_posture_passes_every_check(fresh_database, db_check):
    assert posture_of(fresh_database).problems == []

    code, lines = db_check(fresh_database)
    assert code == 0
    assert [line for line in lines if line.startswith("FAIL")] == []
    assert [line for line in lines if line.startswith("OK")]

    with app_client(fresh_database.settings()) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json() == {"status": "ready"}
        assert client.get("/healthz").status_code == 200


def test_readyz_follows_the_posture_while_serving(fresh_database):
    problem = "row-level security is not forced on task"
    with (
        app_client(fresh_database.settings()) as client,
        fresh_database.connect(autocommit=True) as owner,
    ):
        assert client.get("/readyz").status_code == 200

        owner.execute("ALTER TABLE task NO FORCE ROW LEVEL SECURITY")
        ready = client.get("/readyz")
        assert ready.status_code == 503
        assert ready.headers["content-type"] == PROBLEM_JSON
        body = ready.json()
        assert body["status"] == 503
        assert body["problems"] == [problem]
        assert client.get("/healthz").status_code == 200
        assert client.get("/healthz").json() == {"status": "ok"}

        owner.execute("ALTER TABLE task FORCE ROW LEVEL SECURITY")
        assert client.get("/readyz").status_code == 200


def catalog(database: TestDatabase) -> dict[str, Any]:
    with database.connect(autocommit=True) as conn:
        row = conn.execute(
            """
            SELECT to_regclass('task') IS NOT NULL,
                   EXISTS (SELECT 1 FROM pg_proc WHERE proname = 'task_touch'),
                   EXISTS (SELECT 1 FROM pg_roles WHERE rolname = %s)
            """,
            (database.app_role,),
        ).fetchone()
    assert row is not None
    return dict(zip(("table", "trigger_function", "role"), row, strict=True))


def test_downgrade_to_base_removes_everything_and_upgrade_restores_it(fresh_database):
    everything = {"table": True, "trigger_function": True, "role": True}
    assert catalog(fresh_database) == everything

    command.downgrade(alembic_config(fresh_database), "base")
    assert catalog(fresh_database) == {"table": False, "trigger_function": False, "role": False}

    run_migrations(fresh_database.url, fresh_database.app_role)
    assert catalog(fresh_database) == everything
    assert posture_of(fresh_database).problems == []
    with app_client(fresh_database.settings()) as client:
        assert client.get("/readyz").status_code == 200
        created = client.post("/api/alice/tasks", json={"title": "again"}, headers=bearer("alice"))
        assert created.status_code == 201, created.text
        listed = client.get("/api/alice/tasks", headers=bearer("alice"))
        assert [task["id"] for task in listed.json()] == [created.json()["id"]]


def test_downgrade_keeps_a_role_another_database_still_uses(fresh_database, server_url):
    """The role is cluster-wide: a downgrade here must not break another database's grants."""
    other = f"todo_other_{uuid.uuid4().hex[:10]}"
    role = sql.Identifier(fresh_database.app_role)
    with psycopg.connect(server_url, autocommit=True) as server:
        server.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(other)))
    try:
        with psycopg.connect(libpq_url(server_url, other), autocommit=True) as conn:
            conn.execute("CREATE TABLE kept (id int)")
            conn.execute(sql.SQL("GRANT SELECT ON kept TO {}").format(role))

        command.downgrade(alembic_config(fresh_database), "base")
        assert catalog(fresh_database) == {"table": False, "trigger_function": False, "role": True}
    finally:
        with psycopg.connect(server_url, autocommit=True) as server:
            server.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(other)))
