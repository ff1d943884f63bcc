"""`todo-api db audit`: the live security posture, written out the way a DBA would.

Pass or fail is decided by `check_posture` alone (the same check as start-up, /readyz and
`todo-api db check`); everything else here is information read from the catalogs with
read-only queries and bound parameters: row-level security per table, each live policy beside
its file in db/policies/, the application role's attributes, memberships, ownership and
privileges, and every role that can get round row-level security in this database.
"""

import difflib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, text

from service.db import Database
from service.posture import (
    POLICIES_DIR,
    TABLE,
    LivePolicy,
    check_posture,
    expected_policy_sources,
    live_policies,
    owned_objects,
)
from service.settings import PROJECT_ROOT

COMMANDS = {"r": "SELECT", "a": "INSERT", "w": "UPDATE", "d": "DELETE", "*": "ALL"}
PLAIN_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_$]*$")

IDENTICAL, DIFFERS, MISSING, EXTRA = "identical", "differs", "missing", "extra"


# --- the report --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableSecurity:
    name: str
    owner: str
    rls_enabled: bool
    rls_forced: bool
    policies: int


@dataclass(frozen=True)
class PolicyAudit:
    name: str
    command: str
    status: str  # identical | differs | missing | extra
    file: str | None  # the file in db/policies/ that creates it, relative to the project
    expected: str | None  # the file's policy as this server deparses it
    live: str | None  # the live policy, deparsed
    diff: list[str] = field(default_factory=list)  # unified, expected -> live


@dataclass(frozen=True)
class Privilege:
    object_type: str  # database | schema | table | view | sequence | ...
    object_name: str
    privilege: str
    columns: list[str] = field(default_factory=list)  # empty: the whole object


@dataclass(frozen=True)
class RoleAudit:
    name: str
    exists: bool
    superuser: bool = False
    bypassrls: bool = False
    login: bool = False
    inherit: bool = False
    createrole: bool = False
    createdb: bool = False
    replication: bool = False
    member_of: list[str] = field(default_factory=list)  # direct memberships
    granted_to: list[str] = field(default_factory=list)  # direct members: who can switch to it
    owns: list[str] = field(default_factory=list)
    privileges: list[Privilege] = field(default_factory=list)

    @property
    def attributes(self) -> list[str]:
        flags = (
            ("SUPERUSER", self.superuser),
            ("BYPASSRLS", self.bypassrls),
            ("LOGIN", self.login),
            ("INHERIT", self.inherit),
            ("CREATEROLE", self.createrole),
            ("CREATEDB", self.createdb),
            ("REPLICATION", self.replication),
        )
        return [name if on else f"NO{name}" for name, on in flags]


@dataclass(frozen=True)
class Bypasser:
    role: str
    login: bool
    how: list[str]  # "superuser", "BYPASSRLS", "owns task", "member of <role>"


@dataclass
class AuditReport:
    database: str
    server_version: str
    connected_as: str
    table: str
    problems: list[str]
    tables: list[TableSecurity]
    policies: list[PolicyAudit] | None  # None: there is no table to compare them on
    app_role: RoleAudit
    bypassers: list[Bypasser]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["app_role"]["attributes"] = self.app_role.attributes
        return {"ok": self.ok, **data}

    def to_text(self) -> str:
        sections = [
            self._header(),
            self._tables_text(),
            self._policies_text(),
            self._role_text(),
            self._privileges_text(),
            self._bypassers_text(),
            self._verdict_text(),
        ]
        return "\n\n".join("\n".join(lines) for lines in sections)

    def _header(self) -> list[str]:
        return [
            "Security posture audit",
            *columns(
                [
                    ["database", self.database],
                    ["server", f"PostgreSQL {self.server_version}"],
                    ["connected as", self.connected_as],
                    ["application role", self.app_role.name],
                    ["policy files", display_path(POLICIES_DIR)],
                ]
            ),
        ]

    def _tables_text(self) -> list[str]:
        rows = [
            [t.name, t.owner, yes_no(t.rls_enabled), yes_no(t.rls_forced), str(t.policies)]
            for t in self.tables
        ]
        title = f"Row-level security (required: enabled and forced on {self.table})"
        if not rows:
            return [title, "  (no tables)"]
        return [title, *columns([["table", "owner", "enabled", "forced", "policies"], *rows])]

    def _policies_text(self) -> list[str]:
        title = f"Policies on {self.table}, live against {display_path(POLICIES_DIR)}/"
        if self.policies is None:
            return [title, f"  (not compared: table {self.table} does not exist)"]
        if not self.policies:
            return [title, "  (none, and no policy files)"]
        rows = [[p.name, p.command, p.file or "-", p.status] for p in self.policies]
        lines = [title, *columns([["policy", "command", "file", "status"], *rows])]
        for policy in self.policies:
            if policy.status == DIFFERS:
                lines += ["", *indent(policy.diff)]
            elif policy.status == MISSING:
                lines += ["", f"  {policy.name} is missing; {policy.file} creates:"]
                lines += indent(policy.expected, 4)
            elif policy.status == EXTRA:
                lines += ["", f"  {policy.name} is not in {display_path(POLICIES_DIR)}/; live:"]
                lines += indent(policy.live, 4)
        return lines

    def _role_text(self) -> list[str]:
        role = self.app_role
        title = f"Application role {role.name}"
        if not role.exists:
            return [title, "  does not exist"]
        return [
            title,
            *columns(
                [
                    ["attributes", " ".join(role.attributes)],
                    ["member of", listed(role.member_of)],
                    ["granted to", listed(role.granted_to)],
                    ["owns", listed(role.owns, "nothing")],
                ]
            ),
        ]

    def _privileges_text(self) -> list[str]:
        role = self.app_role
        title = f"Privileges of {role.name} (direct, through PUBLIC, or inherited)"
        if not role.exists:
            return [title, "  (no such role)"]
        if not role.privileges:
            return [title, "  (none)"]
        rows = [
            [f"{p.object_type} {p.object_name}", p.privilege, ", ".join(p.columns)]
            for p in role.privileges
        ]
        return [title, *columns([["object", "privilege", "columns"], *rows])]

    def _bypassers_text(self) -> list[str]:
        title = f"Who can get round row-level security on {self.table} (information)"
        rows = [[b.role, yes_no(b.login), ", ".join(b.how)] for b in self.bypassers]
        lines = [title, *columns([["role", "login", "how"], *rows])] if rows else [title]
        return [
            *lines,
            f"  ({self.table}'s owner is bound by FORCE ROW LEVEL SECURITY but may turn it off)",
        ]

    def _verdict_text(self) -> list[str]:
        title = "Result (the check made at start-up, by /readyz and by `todo-api db check`)"
        if not self.ok:
            return [title, *(f"  FAIL  {problem}" for problem in self.problems)]
        return [
            title,
            f"  OK    row-level security is enabled and forced on {self.table}",
            f"  OK    the live policies are exactly those in {display_path(POLICIES_DIR)}/",
            f"  OK    role {self.app_role.name} cannot bypass them",
        ]


# --- text helpers ------------------------------------------------------------------------------


def columns(rows: list[list[str]], gap: int = 2) -> list[str]:
    """Rows as aligned columns, indented by two spaces, without trailing blanks."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [("  " + (" " * gap).join(map(str.ljust, row, widths))).rstrip() for row in rows]


def indent(text_or_lines: str | list[str] | None, by: int = 2) -> list[str]:
    lines = text_or_lines.splitlines() if isinstance(text_or_lines, str) else text_or_lines or []
    return [(" " * by + line).rstrip() for line in lines]


def yes_no(value: bool) -> str:
    return "yes" if value else "no"


def listed(names: list[str], empty: str = "(none)") -> str:
    return ", ".join(names) if names else empty


def display_path(path: Path) -> str:
    return str(path.relative_to(PROJECT_ROOT)) if path.is_relative_to(PROJECT_ROOT) else str(path)


def quote_identifier(name: str) -> str:
    return name if PLAIN_IDENTIFIER.match(name) else '"' + name.replace('"', '""') + '"'


def policy_sql(policy: LivePolicy, table: str = TABLE) -> str:
    """The policy as a CREATE POLICY statement, one clause a line, so a diff names the clause."""
    lines = [
        f"CREATE POLICY {quote_identifier(policy.name)} ON {table}",
        f"    AS {'PERMISSIVE' if policy.permissive else 'RESTRICTIVE'}",
        f"    FOR {COMMANDS.get(policy.command, policy.command)}",
        f"    TO {', '.join(policy.roles)}",
    ]
    if policy.using is not None:
        lines.append(f"    USING ({policy.using})")
    if policy.with_check is not None:
        lines.append(f"    WITH CHECK ({policy.with_check})")
    return "\n".join(lines) + ";"


# --- reading the catalogs ----------------------------------------------------------------------


def audit_database(db: Database) -> AuditReport:
    with db.engine.connect() as conn:
        report = audit(conn, db.app_role)
        conn.rollback()
    return report


def audit(conn: Connection, app_role: str) -> AuditReport:
    posture = check_posture(conn, app_role)
    database, version, user = conn.execute(
        text("SELECT current_database(), current_setting('server_version'), current_user")
    ).one()
    owner_oid = conn.scalar(
        text("SELECT relowner FROM pg_class WHERE oid = to_regclass(:table)"), {"table": TABLE}
    )
    return AuditReport(
        database=database,
        server_version=version,
        connected_as=user,
        table=TABLE,
        problems=posture.problems,
        tables=table_security(conn),
        policies=policy_audit(conn) if owner_oid is not None else None,
        app_role=role_audit(conn, app_role),
        bypassers=bypassers(conn, owner_oid),
    )


# Schemas a DBA would call the database's own: not the catalogs, TOAST or temporary ones.
_USER_SCHEMA = """
    n.nspname NOT IN ('pg_catalog', 'information_schema')
    AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
"""


def table_security(conn: Connection) -> list[TableSecurity]:
    rows = conn.execute(
        text(
            f"""
            SELECT c.oid::regclass::text, pg_get_userbyid(c.relowner),
                   c.relrowsecurity, c.relforcerowsecurity,
                   (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid)
            FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE {_USER_SCHEMA} AND c.relkind IN ('r', 'p')
            ORDER BY 1
            """
        )
    ).all()
    return [TableSecurity(*row) for row in rows]


def policy_audit(conn: Connection) -> list[PolicyAudit]:
    """Every policy that is live on the table or created by a file, and how the two compare."""
    live = live_policies(conn, TABLE)
    expected = expected_policy_sources(conn)
    return [
        compare_policy(name, live.get(name), *expected.get(name, (None, None)))
        for name in sorted(live.keys() | expected.keys())
    ]


def compare_policy(
    name: str, live: LivePolicy | None, expected: LivePolicy | None, path: Path | None
) -> PolicyAudit:
    live_sql = policy_sql(live) if live else None
    expected_sql = policy_sql(expected) if expected else None
    file = display_path(path) if path else None
    diff: list[str] = []
    if expected is None:
        status = EXTRA
    elif live is None:
        status = MISSING
    elif live == expected:  # the very comparison check_posture makes
        status = IDENTICAL
    else:
        status = DIFFERS
        diff = list(
            difflib.unified_diff(
                (expected_sql or "").splitlines(),
                (live_sql or "").splitlines(),
                fromfile=f"{file} (deparsed)",
                tofile=f"live {name} on {TABLE}",
                lineterm="",
            )
        )
    command = next(p.command for p in (live, expected) if p is not None)
    return PolicyAudit(
        name, COMMANDS.get(command, command), status, file, expected_sql, live_sql, diff
    )


def role_audit(conn: Connection, app_role: str) -> RoleAudit:
    row = conn.execute(
        text(
            """
            SELECT oid, rolsuper, rolbypassrls, rolcanlogin, rolinherit,
                   rolcreaterole, rolcreatedb, rolreplication
            FROM pg_roles WHERE rolname = :role
            """
        ),
        {"role": app_role},
    ).one_or_none()
    if row is None:
        return RoleAudit(app_role, exists=False)
    role_oid, *flags = row
    member_of = conn.scalars(
        text(
            """
            SELECT DISTINCT pg_get_userbyid(roleid) FROM pg_auth_members
            WHERE member = :role_oid ORDER BY 1
            """
        ),
        {"role_oid": role_oid},
    ).all()
    granted_to = conn.scalars(
        text(
            """
            SELECT DISTINCT pg_get_userbyid(member) FROM pg_auth_members
            WHERE roleid = :role_oid ORDER BY 1
            """
        ),
        {"role_oid": role_oid},
    ).all()
    return RoleAudit(
        app_role,
        True,
        *flags,
        member_of=list(member_of),
        granted_to=list(granted_to),
        owns=owned_objects(conn, role_oid),
        privileges=privileges(conn, role_oid),
    )


_RELATION_KIND = """
    CASE c.relkind WHEN 'v' THEN 'view' WHEN 'm' THEN 'materialized view'
                   WHEN 'f' THEN 'foreign table' ELSE 'table' END
"""

# Effective privileges (has_*_privilege: direct, through PUBLIC, or inherited), in the order
# GRANT lists them. A column privilege is shown only where the table-level one is absent.
_PRIVILEGES = text(
    f"""
    SELECT 1, 'database', quote_ident(d.datname), p.name, NULL::text[], p.ord
    FROM pg_database d,
         unnest(ARRAY['CREATE', 'CONNECT', 'TEMPORARY']) WITH ORDINALITY AS p(name, ord)
    WHERE d.datname = current_database() AND has_database_privilege(:role_oid, d.oid, p.name)
    UNION ALL
    SELECT 2, 'schema', quote_ident(n.nspname), p.name, NULL, p.ord
    FROM pg_namespace n, unnest(ARRAY['USAGE', 'CREATE']) WITH ORDINALITY AS p(name, ord)
    WHERE {_USER_SCHEMA} AND has_schema_privilege(:role_oid, n.oid, p.name)
    UNION ALL
    SELECT 3, {_RELATION_KIND}, c.oid::regclass::text, p.name, NULL, p.ord
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
         unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES',
                      'TRIGGER']) WITH ORDINALITY AS p(name, ord)
    WHERE {_USER_SCHEMA} AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
      AND has_table_privilege(:role_oid, c.oid, p.name)
    UNION ALL
    SELECT 3, {_RELATION_KIND}, c.oid::regclass::text, p.name,
           array_agg(a.attname::text ORDER BY a.attnum), p.ord
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
         JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped,
         unnest(ARRAY['SELECT', 'INSERT', 'UPDATE', 'REFERENCES'])
             WITH ORDINALITY AS p(name, ord)
    WHERE {_USER_SCHEMA} AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
      AND NOT has_table_privilege(:role_oid, c.oid, p.name)
      AND has_column_privilege(:role_oid, c.oid, a.attnum, p.name)
    GROUP BY c.oid, c.relkind, p.name, p.ord
    UNION ALL
    SELECT 4, 'sequence', c.oid::regclass::text, p.name, NULL, p.ord
    FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace,
         unnest(ARRAY['USAGE', 'SELECT', 'UPDATE']) WITH ORDINALITY AS p(name, ord)
    WHERE {_USER_SCHEMA} AND c.relkind = 'S'
      AND has_sequence_privilege(:role_oid, c.oid, p.name)
    ORDER BY 1, 3, 6
    """
)


def privileges(conn: Connection, role_oid: int) -> list[Privilege]:
    rows = conn.execute(_PRIVILEGES, {"role_oid": role_oid}).all()
    return [
        Privilege(object_type, name, privilege, list(cols or []))
        for _, object_type, name, privilege, cols, _ in rows
    ]


# Superusers and BYPASSRLS roles skip policies; the table's owner may turn them off; and any
# role that is a member of one of those can become it. Superusers are members of every role,
# so their memberships are not listed.
_BYPASSERS = text(
    """
    WITH escapes AS (
        SELECT oid, rolname FROM pg_roles
        WHERE rolsuper OR rolbypassrls OR oid = :owner_oid
    )
    SELECT r.rolname, r.rolcanlogin, r.rolsuper, r.rolbypassrls,
           coalesce(r.oid = :owner_oid, false),
           CASE WHEN r.rolsuper THEN ARRAY[]::text[] ELSE ARRAY(
               SELECT e.rolname::text FROM escapes e
               WHERE e.oid <> r.oid AND pg_has_role(r.oid, e.oid, 'MEMBER') ORDER BY 1
           ) END
    FROM pg_roles r
    WHERE r.oid IN (SELECT oid FROM escapes)
       OR EXISTS (SELECT 1 FROM escapes e
                  WHERE e.oid <> r.oid AND pg_has_role(r.oid, e.oid, 'MEMBER'))
    ORDER BY 1
    """
)


def bypassers(conn: Connection, owner_oid: int | None) -> list[Bypasser]:
    found = []
    for name, login, superuser, bypassrls, owns, member_of in conn.execute(
        _BYPASSERS, {"owner_oid": owner_oid}
    ):
        how = [
            label
            for label, applies in (
                ("superuser", superuser),
                ("BYPASSRLS", bypassrls),
                (f"owns {TABLE}", owns),
            )
            if applies
        ]
        how += [f"member of {role}" for role in member_of]
        found.append(Bypasser(name, login, how))
    return found
