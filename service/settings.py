"""All configuration, read once from the environment (and an optional .env file)."""

import os
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

if TYPE_CHECKING:
    from sqlalchemy.engine import URL

# Where alembic.ini and db/ (migrations, policies) live: the checkout, or TODO_API_ROOT when the
# package is installed apart from them, as in the container image.
PROJECT_ROOT = Path(os.environ.get("TODO_API_ROOT") or Path(__file__).resolve().parent.parent)

ASYMMETRIC_ALGORITHMS = ("EdDSA", "ES256", "RS256")
MIN_SECRET_BYTES = 32


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    database_url: SecretStr | None = None
    database_admin_url: SecretStr | None = None
    data_dir: Path = Path(".data/pg")
    app_db_role: str = Field("todo_app", pattern=r"^[a-z_][a-z0-9_]{0,62}$")

    jwt_secret: SecretStr | None = Field(
        None, validation_alias=AliasChoices("jwt_secret", "better_auth_secret")
    )
    jwt_jwks_url: str | None = None
    jwt_algorithms: Annotated[tuple[str, ...], NoDecode] = ()
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    jwt_leeway_seconds: float = Field(30, ge=0, le=300)
    jwt_user_claim: str = "sub"
    jwks_cache_seconds: float = Field(300, gt=0)
    # An unknown kid refetches the JWKS at most this often, so made-up kids cannot flood the
    # identity provider, while a freshly rotated key is picked up within this time.
    jwks_refresh_cooldown_seconds: float = Field(1, ge=0)
    # A verified token is trusted again, without its signature being checked, for this long:
    # never past its exp, and only while the fetched JWKS it was checked against is still the
    # current one (a withdrawn key stops working exactly as without this cache). 0: off.
    jwt_cache_seconds: float = Field(30, ge=0)

    # Per worker process. Overflow connections are closed as soon as they are returned, so
    # under steady load they are opened and closed again and again (bench/RESULTS.md).
    db_pool_size: int = Field(10, ge=1)
    db_max_overflow: int = Field(0, ge=0)
    db_pool_timeout_seconds: float = Field(5, gt=0)
    db_connect_timeout_seconds: int = Field(5, ge=1)
    db_connect_attempts: int = Field(4, ge=1)
    db_prepared_statements: bool = False
    # Each statement of a request's transaction (a row-lock wait too); 0 turns the bound off.
    db_statement_timeout_seconds: float = Field(10, ge=0)
    retry_after_seconds: int = Field(5, ge=1)
    # On SIGTERM, requests in flight get this long to finish before they are cancelled; a
    # client that stalls forever cannot keep the process (and its database) alive.
    shutdown_timeout_seconds: int = Field(30, ge=1)
    max_body_bytes: int = Field(64 * 1024, ge=1024)

    log_level: str = "INFO"
    # json: one JSON object per line; text: for people; auto: text on a terminal, else json.
    log_format: Literal["auto", "json", "text"] = "auto"

    @field_validator("jwt_algorithms", mode="before")
    @classmethod
    def _split_algorithms(cls, value: object) -> object:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("jwt_algorithms")
    @classmethod
    def _known_algorithms(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        unknown = set(value) - {"HS256", *ASYMMETRIC_ALGORITHMS}
        if unknown:
            raise ValueError(f"unsupported JWT algorithms: {sorted(unknown)}")
        return value

    @property
    def embedded(self) -> bool:
        return self.database_url is None

    @property
    def accepted_algorithms(self) -> tuple[str, ...]:
        """The fixed list a token's `alg` must be in; never taken from the token."""
        if self.jwt_algorithms:
            return self.jwt_algorithms
        defaults: tuple[str, ...] = ()
        if self.jwt_secret is not None:
            defaults += ("HS256",)
        if self.jwt_jwks_url:
            defaults += ASYMMETRIC_ALGORITHMS
        return defaults

    def check_auth_config(self) -> None:
        """Refuse to start with no usable way to verify tokens."""
        if self.jwt_secret is None and not self.jwt_jwks_url:
            raise ValueError("set JWT_SECRET (or BETTER_AUTH_SECRET) or JWT_JWKS_URL")
        if self.jwt_secret is not None:
            length = len(self.jwt_secret.get_secret_value().encode())
            if length < MIN_SECRET_BYTES:
                raise ValueError(
                    f"JWT_SECRET is {length} bytes; at least {MIN_SECRET_BYTES} are required"
                )


def sqlalchemy_url(raw: SecretStr | str) -> "URL":
    """Accept postgres://, postgresql:// or postgresql+psycopg:// and use psycopg 3."""
    from sqlalchemy.engine import make_url  # not at import: see service.embedded

    value = raw.get_secret_value() if isinstance(raw, SecretStr) else raw
    return make_url(value).set(drivername="postgresql+psycopg")


def masked(url: "URL") -> str:
    return url.render_as_string(hide_password=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
