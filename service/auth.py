"""Bearer-token verification: HS256 shared secret and/or asymmetric keys from a JWKS URL."""

import logging
import threading
import time
from collections.abc import Callable
from typing import Annotated, Any, TypeGuard

import jwt
from fastapi import Depends, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param
from jwt.api_jwk import PyJWTSetWithTimestamp

from service.errors import Problem, Unauthorized
from service.models import USER_ID_MAX, storable_text
from service.settings import Settings

log = logging.getLogger(__name__)

MAX_TOKEN_CHARS = 8192
SHARED_SECRET = object()  # what an HS256 token is checked with (nothing to expire)


class VerifiedTokens:
    """Tokens whose signature and claims have been checked, each trusted again for a short
    while: never past the end of its validity and, for a token checked against a JWKS, only
    while that same fetched key set is current (a refresh that drops its key drops it too).
    Only successes are kept."""

    def __init__(
        self, seconds: float, current_key_set: Callable[[], object | None], capacity: int = 10_000
    ) -> None:
        self.seconds = seconds
        self.capacity = capacity
        self._current_key_set = current_key_set
        self._users: dict[str, tuple[str, float, object | None]] = {}
        self._writing = threading.Lock()  # JWKS tokens are verified in worker threads

    def user_of(self, token: str) -> str | None:
        entry = self._users.get(token)
        if entry is None:
            return None
        user, until, key_set = entry
        stale_keys = key_set is not None and key_set is not self._current_key_set()
        if stale_keys or time.time() >= until:
            self._users.pop(token, None)
            return None
        return user

    def remember(
        self, token: str, user: str, *, valid_until: float, key_set: object | None = None
    ) -> None:
        """`key_set`: the fetched JWKS the token was checked against; None for a secret."""
        if self.seconds <= 0:
            return
        with self._writing:
            if len(self._users) >= self.capacity:
                self._users.pop(next(iter(self._users)), None)  # the oldest entry
            until = min(time.time() + self.seconds, valid_until)
            self._users[token] = (user, until, key_set)


class TokenVerifier:
    def __init__(self, settings: Settings) -> None:
        self.algorithms = settings.accepted_algorithms
        self.secret = settings.jwt_secret.get_secret_value() if settings.jwt_secret else None
        self.jwks = (
            jwt.PyJWKClient(
                settings.jwt_jwks_url,
                # Keys are looked up in the cached set (refreshed every jwks_cache_seconds);
                # a per-kid cache would keep trusting a revoked key until restart.
                cache_keys=False,
                lifespan=settings.jwks_cache_seconds,
                cooldown_duration=settings.jwks_refresh_cooldown_seconds,
                timeout=5,
            )
            if settings.jwt_jwks_url
            else None
        )
        self.issuer = settings.jwt_issuer
        self.audience = settings.jwt_audience
        self.leeway = settings.jwt_leeway_seconds
        self.user_claim = settings.jwt_user_claim
        self.verified = VerifiedTokens(settings.jwt_cache_seconds, self._current_key_set)

    async def verify(self, token: str) -> str:
        """`user_id`, on the event loop for a shared secret; a JWKS lookup may fetch the key
        set over the network, so asymmetric tokens are verified in the thread pool."""
        if (user := self.verified.user_of(token)) is not None:
            return user
        if self.jwks is None:
            return self.user_id(token)
        return await run_in_threadpool(self.user_id, token)

    def user_id(self, token: str) -> str:
        """The token's user, or Unauthorized. Never trusts the token's own choice of key type."""
        if len(token) > MAX_TOKEN_CHARS:
            raise Unauthorized("The token is too large.", token_sent=True)
        try:
            claims, checked_with = self._decode(token)
        except jwt.PyJWKClientConnectionError:
            log.error("JWKS endpoint unreachable")
            raise Problem(
                503, "Token keys cannot be fetched right now.", headers={"Retry-After": "5"}
            ) from None
        except (jwt.PyJWTError, ValueError, TypeError) as exc:
            raise Unauthorized(_reason(exc), token_sent=True) from None
        user = claims.get(self.user_claim)
        if not _usable_user_id(user):
            raise Unauthorized("The token names no user.", token_sent=True)
        self._remember(token, user, claims, checked_with)
        return user

    def _remember(
        self, token: str, user: str, claims: dict[str, Any], checked_with: object
    ) -> None:
        """`checked_with`: SHARED_SECRET, or the fetched JWKS that was current when the check
        began (None if none was); the token is remembered only while that set stays current."""
        until = float(claims["exp"]) + self.leeway
        if checked_with is SHARED_SECRET:
            self.verified.remember(token, user, valid_until=until)
            return
        key_set = self._current_key_set()
        if key_set is None or checked_with is not key_set or self.jwks is None:
            return  # fetched or refreshed during this check: check it again next time
        lifespan = self.jwks.jwk_set_cache.lifespan  # type: ignore[union-attr]  # has a set
        set_expires = time.time() + key_set.get_timestamp() + lifespan - time.monotonic()
        self.verified.remember(token, user, valid_until=min(until, set_expires), key_set=key_set)

    def _current_key_set(self) -> PyJWTSetWithTimestamp | None:
        cache = self.jwks.jwk_set_cache if self.jwks is not None else None
        return cache.jwk_set_with_timestamp if cache is not None else None

    def _decode(self, token: str) -> tuple[dict[str, Any], object]:
        """The claims, and what the signature was checked with (see _remember)."""
        algorithm = jwt.get_unverified_header(token).get("alg")
        if algorithm not in self.algorithms:
            raise jwt.InvalidAlgorithmError("algorithm not accepted")
        if algorithm == "HS256":
            if self.secret is None:
                raise jwt.InvalidAlgorithmError("algorithm not accepted")
            key: Any = self.secret
            allowed = ["HS256"]
            checked_with: object = SHARED_SECRET
        else:
            if self.jwks is None:
                raise jwt.InvalidAlgorithmError("algorithm not accepted")
            checked_with = self._current_key_set()
            key = self.jwks.get_signing_key_from_jwt(token).key
            allowed = [alg for alg in self.algorithms if alg != "HS256"]
        claims = jwt.decode(
            token,
            key,
            algorithms=allowed,
            issuer=self.issuer,
            audience=self.audience,
            leeway=self.leeway,
            options={"require": ["exp"], "verify_aud": self.audience is not None},
        )
        return claims, checked_with


def _usable_user_id(user: object) -> TypeGuard[str]:
    """A non-empty string that PostgreSQL can store as text and the task table accepts."""
    if not isinstance(user, str) or not 1 <= len(user) <= USER_ID_MAX:
        return False
    try:
        storable_text(user)
    except ValueError:
        return False
    return True


def _reason(exc: Exception) -> str:
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "The token has expired."
    if isinstance(exc, jwt.ImmatureSignatureError):
        return "The token is not valid yet."
    if isinstance(exc, jwt.InvalidIssuerError | jwt.InvalidAudienceError):
        return "The token was issued for another service."
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return "The token lacks a required claim."
    return "The token is invalid."


bearer_scheme = HTTPBearer(auto_error=False, description="A JWT from your identity provider.")


async def current_user(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
) -> str:
    if credentials is None:
        raise Unauthorized("A bearer token is required.", token_sent=False)
    verifier: TokenVerifier = request.app.state.verifier
    user = await verifier.verify(credentials.credentials)
    request.state.user_id = user
    return user


BearerToken = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]


UserId = Annotated[
    str,
    Path(
        min_length=1,
        max_length=USER_ID_MAX,
        description="The caller's user id, exactly as in the token's user claim.",
        examples=["alice"],
    ),
]


async def path_owner(request: Request, user_id: UserId, token: BearerToken) -> str:
    """The path's {user_id}, if it is the caller (401, then 403). Decided before any database
    work. The token is checked by a plain call, not a nested dependency: each level of
    dependencies costs every request (bench/RESULTS.md).

    A path id outside UserId's limits fails validation before this runs; the error handler
    then calls this directly (authorize_request), so that 401 and 403 still come first."""
    if user_id != await current_user(request, token):
        raise Problem(403, "This token does not belong to that user.")
    return user_id


async def authorize_request(request: Request) -> None:
    """The same checks as path_owner, for a request whose body failed before they could run."""
    if "user_id" not in request.path_params:
        return
    scheme, token = get_authorization_scheme_param(request.headers.get("Authorization"))
    bearer = scheme.lower() == "bearer" and token
    credentials = HTTPAuthorizationCredentials(scheme=scheme, credentials=token) if bearer else None
    await path_owner(request, request.path_params["user_id"], credentials)
