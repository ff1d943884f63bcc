"""Fail closed: the security posture the service refuses to run without.

Read-only catalog checks. The policies in db/policies/ are compared with the live ones by
creating them on a temporary copy of the table inside a transaction that is rolled back, so both
sides are deparsed by PostgreSQL itself and compare exactly.
"""

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Connection, text

from service.settings import PROJECT_ROOT

POLICIES_DIR = PROJECT_ROOT / "db" / "policies"
TABLE = "task"
# TRUNCATE ignores row-level security; TRIGGER and REFERENCES are never needed by requests.
FORBIDDEN_TABLE_PRIVILEGES = ("TRUNCATE", "TRIGGER", "REFERENCES")


@dataclass(frozen=True)
class LivePolicy:
    name: str
    permissive: bool
    command: str
    roles: tuple[str, ...]
    using: str | None
    with_check: str | None


@dataclass
class Posture:
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def policy_files(directory: Path = POLICIES_DIR) -> list[Path]:
    return sorted(directory.glob("*.sql"))


_POLICIES_OF = text(
    """
    SELECT polname, polpermissive, polcmd::text,
           ARRAY(SELECT CASE WHEN r = 0 THEN 'public' ELSE r::regrole::text END
                 FROM unnest(polroles) AS r ORDER BY 1),
           pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid)
    FROM pg_policy WHERE polrelid = CAST(:relation AS regclass) ORDER BY polname
    """
)


_POLICY_NAMES_OF = text(
    "SELECT polname FROM pg_policy WHERE polrelid = CAST(:relation AS regclass) ORDER BY 1"
)


def live_policies(conn: Connection, relation: str) -> dict[str, LivePolicy]:
    rows = conn.execute(_POLICIES_OF, {"relation": relation}).all()
    return {
        row[0]: LivePolicy(row[0], row[1], row[2], tuple(row[3]), row[4], row[5]) for row in rows
    }


# Columns and types only, read from the catalog: unlike LIKE, this needs no privilege on the
# table, so it works for a least-privilege login role. %I quotes each name.
_TEMP_COPY_DDL = text(
    """
    SELECT format('CREATE TEMP TABLE %I (%s)', CAST(:table AS text), string_agg(
               format('%I %s', attname, format_type(atttypid, atttypmod)), ', ' ORDER BY attnum))
    FROM pg_attribute
    WHERE attrelid = to_regclass(:table) AND attnum > 0 AND NOT attisdropped
    """
)


def expected_policies(conn: Connection, directory: Path = POLICIES_DIR) -> dict[str, LivePolicy]:
    """The policies the files define, deparsed by this server, without touching the real table."""
    return {name: policy for name, (policy, _) in expected_policy_sources(conn, directory).items()}


def expected_policy_sources(
    conn: Connection, directory: Path = POLICIES_DIR
) -> dict[str, tuple[LivePolicy, Path]]:
    """Each policy the files define, deparsed by this server, with the file that creates it."""
    temp_table = f"pg_temp.{TABLE}"
    created_by: dict[str, Path] = {}
    with conn.begin_nested() as savepoint:
        # pg_temp comes first on the search path, so the files' "ON task" lands on this copy.
        conn.exec_driver_sql(conn.execute(_TEMP_COPY_DDL, {"table": TABLE}).scalar_one())
        for path in policy_files(directory):
            conn.exec_driver_sql(path.read_text())
            for name in conn.scalars(_POLICY_NAMES_OF, {"relation": temp_table}):
                created_by.setdefault(name, path)
        expected = live_policies(conn, temp_table)
        savepoint.rollback()
    return {name: (policy, created_by[name]) for name, policy in expected.items()}


def policy_differences(live: dict[str, LivePolicy], expected: dict[str, LivePolicy]) -> list[str]:
    problems = [
        f"policy {name} from db/policies/ is missing" for name in expected.keys() - live.keys()
    ]
    problems += [f"policy {name} is not in db/policies/" for name in live.keys() - expected.keys()]
    problems += [
        f"policy {name} differs from db/policies/"
        for name in expected.keys() & live.keys()
        if expected[name] != live[name]
    ]
    return sorted(problems)


def check_posture(conn: Connection, app_role: str) -> Posture:
    posture = Posture()
    table = conn.execute(
        text(
            """
            SELECT c.relrowsecurity, c.relforcerowsecurity, c.relowner
            FROM pg_class c WHERE c.oid = to_regclass(:table)
            """
        ),
        {"table": TABLE},
    ).one_or_none()
    if table is None:
        posture.problems.append(f"table {TABLE} does not exist: run `todo-api migrate`")
        return posture
    rls_enabled, rls_forced, owner_oid = table
    if not rls_enabled:
        posture.problems.append(f"row-level security is not enabled on {TABLE}")
    if not rls_forced:
        posture.problems.append(f"row-level security is not forced on {TABLE}")
    posture.problems += _role_problems(conn, app_role, owner_oid)
    posture.problems += policy_differences(live_policies(conn, TABLE), expected_policies(conn))
    return posture


_OWNED_BY = text(
    """
    SELECT CASE WHEN d.dbid IN (0, (SELECT oid FROM pg_database
                                    WHERE datname = current_database()))
                THEN pg_describe_object(d.classid, d.objid, d.objsubid)
                ELSE 'an object in another database' END
    FROM pg_shdepend d
    WHERE d.refclassid = 'pg_authid'::regclass AND d.refobjid = :role_oid AND d.deptype = 'o'
    ORDER BY 1
    """
)


def owned_objects(conn: Connection, role_oid: int) -> list[str]:
    """Everything the role owns, described by PostgreSQL ("table task", "schema public", ...).

    pg_shdepend records every object a role owns (schemas, functions, tables, ...), in any
    database; owning the schema or the trigger function is as dangerous as owning the table.
    """
    return list(conn.scalars(_OWNED_BY, {"role_oid": role_oid}))


def _role_problems(conn: Connection, app_role: str, owner_oid: int) -> list[str]:
    role = conn.execute(
        text("SELECT oid, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = :role"),
        {"role": app_role},
    ).one_or_none()
    if role is None:
        return [f"application role {app_role} does not exist: run `todo-api migrate`"]
    role_oid, is_super, bypasses = role
    problems = []
    if is_super:
        problems.append(f"application role {app_role} is a superuser")
    if bypasses:
        problems.append(f"application role {app_role} has BYPASSRLS")
    escalations = conn.scalars(
        text(
            """
            SELECT r.rolname FROM pg_roles r
            WHERE r.oid <> :role_oid AND pg_has_role(:role_oid, r.oid, 'MEMBER')
              AND (r.rolsuper OR r.rolbypassrls OR r.oid = :owner_oid)
            ORDER BY 1
            """
        ),
        {"role_oid": role_oid, "owner_oid": owner_oid},
    ).all()
    problems += [f"application role {app_role} can act as {name}" for name in escalations]
    problems += [
        f"application role {app_role} owns {what}" for what in owned_objects(conn, role_oid)
    ]
    for privilege in FORBIDDEN_TABLE_PRIVILEGES:
        if conn.scalar(
            text("SELECT has_table_privilege(:role_oid, to_regclass(:table), :privilege)"),
            {"role_oid": role_oid, "table": TABLE, "privilege": privilege},
        ):
            problems.append(f"application role {app_role} has {privilege} on {TABLE}")
    if not conn.scalar(
        text("SELECT pg_has_role(current_user, :role_oid, 'MEMBER')"), {"role_oid": role_oid}
    ):
        problems.append(f"the connecting user cannot switch to application role {app_role}")
    return problems
