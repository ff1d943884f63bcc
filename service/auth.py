"""Bearer-token verification: HS256 shared secret and/or asymmetric keys from a JWKS URL."""

import logging
import threading
import time
from typing import Annotated, Any, TypeGuard

import jwt
from fastapi import Depends, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi.security.utils import get_authorization_scheme_param

from service.errors import Problem, Unauthorized
from service.models import USER_ID_MAX, storable_text
from service.settings import Settings

log = logging.getLogger(__name__)

MAX_TOKEN_CHARS = 8192


class VerifiedTokens:
    """Tokens whose signature and claims have been checked, each trusted again for a short
    while and never past the end of its validity. Only successes are kept."""

    def __init__(self, seconds: float, capacity: int = 10_000) -> None:
        self.seconds = seconds
        self.capacity = capacity
        self._users: dict[str, tuple[str, float]] = {}
        self._writing = threading.Lock()  # JWKS tokens are verified in worker threads

    def user_of(self, token: str) -> str | None:
        entry = self._users.get(token)
        if entry is None:
            return None
        user, until = entry
        if time.time() >= until:
            self._users.pop(token, None)
            return None
        return user

    def remember(self, token: str, user: str, *, valid_until: float) -> None:
        if self.seconds <= 0:
            return
        with self._writing:
            if len(self._users) >= self.capacity:
                self._users.pop(next(iter(self._users)), None)  # the oldest entry
            self._users[token] = (user, min(time.time() + self.seconds, valid_until))


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
        self.verified = VerifiedTokens(settings.jwt_cache_seconds)

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
            claims = self._decode(token)
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
        self.verified.remember(token, user, valid_until=self._trusted_until(claims))
        return user

    def _trusted_until(self, claims: dict[str, Any]) -> float:
        """The token's own end; for a JWKS key, no later than the key set it was checked
        against is trusted, so that a key withdrawn from the JWKS stops working as soon as
        it would without remembered tokens."""
        until = float(claims["exp"]) + self.leeway
        if self.jwks is None:
            return until
        cache = self.jwks.jwk_set_cache
        fetched = cache.jwk_set_with_timestamp if cache is not None else None
        if cache is None or fetched is None:
            return 0.0  # nothing to bound it by: do not remember
        seconds_left = fetched.get_timestamp() + cache.lifespan - time.monotonic()
        return min(until, time.time() + seconds_left)

    def _decode(self, token: str) -> dict[str, Any]:
        algorithm = jwt.get_unverified_header(token).get("alg")
        if algorithm not in self.algorithms:
            raise jwt.InvalidAlgorithmError("algorithm not accepted")
        if algorithm == "HS256":
            if self.secret is None:
                raise jwt.InvalidAlgorithmError("algorithm not accepted")
            key: Any = self.secret
            allowed = ["HS256"]
        else:
            if self.jwks is None:
                raise jwt.InvalidAlgorithmError("algorithm not accepted")
            key = self.jwks.get_signing_key_from_jwt(token).key
            allowed = [alg for alg in self.algorithms if alg != "HS256"]
        return jwt.decode(
            token,
            key,
            algorithms=allowed,
            issuer=self.issuer,
            audience=self.audience,
            leeway=self.leeway,
            options={"require": ["exp"], "verify_aud": self.audience is not None},
        )


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


CurrentUser = Annotated[str, Depends(current_user)]


UserId = Annotated[
    str,
    Path(
        min_length=1,
        max_length=USER_ID_MAX,
        description="The caller's user id, exactly as in the token's user claim.",
        examples=["alice"],
    ),
]


async def path_owner(user_id: UserId, current: CurrentUser) -> str:
    """The path's {user_id}, if it is the caller. Decided before any database work.

    A path id outside UserId's limits fails validation before this runs; the error handler
    then calls this directly (authorize_request), so that 401 and 403 still come first."""
    if user_id != current:
        raise Problem(403, "This token does not belong to that user.")
    return user_id


OwnerId = Annotated[str, Depends(path_owner)]


async def authorize_request(request: Request) -> None:
    """The same checks as OwnerId, for a request whose body failed before they could run."""
    if "user_id" not in request.path_params:
        return
    scheme, token = get_authorization_scheme_param(request.headers.get("Authorization"))
    bearer = scheme.lower() == "bearer" and token
    credentials = HTTPAuthorizationCredentials(scheme=scheme, credentials=token) if bearer else None
    await path_owner(request.path_params["user_id"], await current_user(request, credentials))
