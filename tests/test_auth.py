"""Token verification against the real app: every bad token is a 401 (RFC 6750), never a 500.

HS256 tokens are signed with the suite's shared secret; asymmetric ones with keys generated here
and served as a JWKS document by a small HTTP server on 127.0.0.1 that the tests start and stop.
"""

import base64
import hashlib
import hmac
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from fastapi.testclient import TestClient
from httpx import Response
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from pydantic import SecretStr
from sqlalchemy import event

from service.auth import VerifiedTokens
from service.logs import JsonFormatter
from service.settings import Settings
from service.testing import TEST_SECRET, TestDatabase, app_client, make_token

Signer = Callable[[bytes], bytes]

PATH = "/api/alice/tasks"
OTHER_SECRET = "another-secret-that-is-also-at-least-32-bytes"
ISSUER = "https://auth.example.com"
AUDIENCE = "todo-api"


# --- helpers -----------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(part: dict[str, Any]) -> str:
    return b64url(json.dumps(part).encode())


def claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "alice", "iat": now, "exp": now + 300, **extra}


def unsigned_token(alg: str = "none") -> str:
    """A token with an empty signature, built by hand."""
    return f"{segment({'alg': alg, 'typ': 'JWT'})}.{segment(claims())}."


def hand_signed(header: dict[str, Any], payload: dict[str, Any], sign: Signer) -> str:
    """Any header and signature, including ones PyJWT refuses to produce."""
    signing_input = f"{segment(header)}.{segment(payload)}"
    return f"{signing_input}.{b64url(sign(signing_input.encode()))}"


def hmac_token(
    header: dict[str, Any], payload: dict[str, Any], key: bytes, digest: Any = hashlib.sha256
) -> str:
    """HMAC over any header with any key (PyJWT would refuse a PEM key as an HMAC secret)."""
    return hand_signed(header, payload, lambda data: hmac.new(key, data, digest).digest())


def swap_payload(token: str, payload: dict[str, Any]) -> str:
    header, _, signature = token.split(".")
    return f"{header}.{segment(payload)}.{signature}"


def token_of_length(length: int) -> str:
    """A valid HS256 token for alice of exactly `length` characters."""
    for kid in ("", "k", "kk", "kkk"):
        for size in range(length * 3 // 4 - 200, length * 3 // 4):
            token = make_token("alice", padding="x" * size, headers={"kid": kid})
            if len(token) == length:
                return token
    raise AssertionError(f"no token of {length} characters")


def with_bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_unauthorized(response: Response, *, sent: str | None) -> None:
    """401, an RFC 6750 challenge, a problem document, and nothing of what was sent echoed."""
    assert response.status_code == 401, response.text
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith("Bearer")
    if sent is None:
        assert "error=" not in challenge
    else:
        assert 'error="invalid_token"' in challenge
        assert sent not in response.text
        signature = sent.rsplit(".", 1)[-1]
        assert not signature or signature not in response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == 401
    assert {"type", "title", "detail"} <= body.keys()


@contextmanager
def checkouts(client: TestClient) -> Iterator[list[object]]:
    """Every connection the app takes from its pool while the block runs."""
    engine = client.app.state.transactions.engine.sync_engine  # type: ignore[attr-defined]
    taken: list[object] = []

    def on_checkout(*args: object) -> None:
        taken.append(args)

    event.listen(engine, "checkout", on_checkout)
    try:
        yield taken
    finally:
        event.remove(engine, "checkout", on_checkout)


# --- no token, or not a bearer token ------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-authorization-header"),
        pytest.param({"Authorization": "Basic YWxpY2U6c2VjcmV0"}, id="basic-scheme"),
        pytest.param({"Authorization": "Token abc.def.ghi"}, id="other-scheme"),
        pytest.param({"Authorization": "Bearer"}, id="bearer-without-token"),
        pytest.param({"Authorization": "Bearer    "}, id="bearer-with-blank-token"),
        pytest.param({"Authorization": ""}, id="empty-header"),
    ],
)
def test_request_without_a_bearer_token_is_challenged_without_error(
    client: TestClient, headers: dict[str, str]
) -> None:
    response = client.get(PATH, headers=headers)
    assert_unauthorized(response, sent=None)
    for value in headers.values():
        if value:
            assert value not in response.text


def test_bearer_scheme_is_case_insensitive(client: TestClient) -> None:
    response = client.get(PATH, headers={"Authorization": f"bearer {make_token('alice')}"})
    assert response.status_code == 200, response.text


# --- bad HS256 tokens ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: "garbage", id="garbage"),
        pytest.param(lambda: "a.b.c", id="three-garbage-segments"),
        pytest.param(lambda: make_token("alice") + "x", id="signature-tampered"),
        pytest.param(
            lambda: swap_payload(make_token("alice"), claims(sub="bob")), id="payload-swapped"
        ),
        pytest.param(lambda: unsigned_token("none"), id="alg-none"),
        pytest.param(lambda: unsigned_token("None"), id="alg-None"),
        pytest.param(lambda: unsigned_token("NONE"), id="alg-NONE"),
        pytest.param(lambda: make_token("alice", algorithm="none", secret=None), id="pyjwt-none"),
        pytest.param(
            lambda: hmac_token({"typ": "JWT"}, claims(), TEST_SECRET.encode()), id="no-alg"
        ),
        pytest.param(
            lambda: hmac_token({"alg": "HS384"}, claims(), TEST_SECRET.encode(), hashlib.sha384),
            id="alg-HS384-same-secret",
        ),
        pytest.param(
            lambda: hmac_token({"alg": "HS512"}, claims(), TEST_SECRET.encode(), hashlib.sha512),
            id="alg-HS512-same-secret",
        ),
        pytest.param(lambda: make_token("alice", secret=OTHER_SECRET), id="wrong-secret"),
        pytest.param(lambda: make_token("alice", ttl=-60), id="expired-beyond-leeway"),
        pytest.param(
            lambda: make_token("alice", nbf=int(time.time()) + 120), id="nbf-beyond-leeway"
        ),
        pytest.param(
            lambda: make_token("alice", iat=int(time.time()) + 120), id="iat-beyond-leeway"
        ),
        pytest.param(lambda: make_token("alice", iat="yesterday"), id="iat-not-a-number"),
        pytest.param(lambda: make_token("alice", exp="soon"), id="exp-not-a-number"),
        pytest.param(lambda: make_token("alice", exp=None), id="exp-null"),
        pytest.param(
            lambda: hmac_token(
                {"alg": "HS256", "typ": "JWT"},
                {"sub": "alice", "iat": int(time.time())},
                TEST_SECRET.encode(),
            ),
            id="no-exp",
        ),
        pytest.param(lambda: make_token(None), id="no-sub"),
        pytest.param(lambda: make_token(None, sub=42), id="sub-number"),
        pytest.param(lambda: make_token(None, sub=None), id="sub-null"),
        pytest.param(lambda: make_token(None, sub=["alice"]), id="sub-list"),
        pytest.param(lambda: make_token(""), id="sub-empty"),
        pytest.param(lambda: make_token("a" * 256), id="sub-longer-than-255"),
        pytest.param(lambda: make_token("nul\u0000byte"), id="sub-with-nul"),
        pytest.param(lambda: make_token("\ud800"), id="sub-lone-surrogate"),
        pytest.param(lambda: token_of_length(8193), id="8193-chars"),
        pytest.param(lambda: make_token("alice", padding="x" * 100_000), id="100k-chars"),
    ],
)
def test_invalid_token_is_401_invalid_token(client: TestClient, build: Callable[[], str]) -> None:
    token = build()
    assert_unauthorized(client.get(PATH, headers=with_bearer(token)), sent=token)


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"exp": -10}, id="expired-within-leeway"),
        pytest.param({"nbf": 10}, id="nbf-within-leeway"),
        pytest.param({"iat": 10}, id="iat-within-leeway"),
        pytest.param({"nbf": -10}, id="nbf-in-the-past"),
    ],
)
def test_time_claims_within_default_leeway_are_accepted(
    client: TestClient, extra: dict[str, int]
) -> None:
    now = int(time.time())
    token = make_token("alice", **{name: now + offset for name, offset in extra.items()})
    assert client.get(PATH, headers=with_bearer(token)).status_code == 200


def test_token_of_exactly_8192_chars_is_accepted(client: TestClient) -> None:
    response = client.get(PATH, headers=with_bearer(token_of_length(8192)))
    assert response.status_code == 200, response.text


def test_leeway_is_configurable(database: TestDatabase) -> None:
    token = make_token("alice", ttl=-10)
    with app_client(database.settings(jwt_leeway_seconds=0)) as strict:
        assert_unauthorized(strict.get(PATH, headers=with_bearer(token)), sent=token)


def test_rejections_do_no_database_work(client: TestClient) -> None:
    with checkouts(client) as taken:
        for token in ("garbage", make_token("alice", secret=OTHER_SECRET), unsigned_token()):
            assert client.get(PATH, headers=with_bearer(token)).status_code == 401
    assert taken == []


def test_tokens_never_reach_the_logs(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    tokens = [make_token("alice"), make_token("alice", secret=OTHER_SECRET), unsigned_token()]
    for token in tokens:
        client.get(PATH, headers=with_bearer(token))
    statuses = [getattr(record, "fields", {}).get("status") for record in caplog.records]
    assert statuses.count(401) == 2  # the access lines were captured (one token is valid)
    logged = caplog.text + "\n".join(JsonFormatter().format(r) for r in caplog.records)
    for token in tokens:
        assert token not in logged
        assert token.split(".")[1] not in logged


# --- 403: a valid token for someone else ---------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("GET", "/{id}", None),
        ("PUT", "/{id}", {"title": "mine now"}),
        ("PATCH", "/{id}/complete", None),
        ("DELETE", "/{id}", None),
    ],
)
def test_token_for_another_user_is_403_and_reveals_nothing(
    client: TestClient,
    create_task: Callable[..., dict[str, Any]],
    auth: Callable[..., dict[str, str]],
    method: str,
    suffix: str,
    body: dict[str, Any] | None,
) -> None:
    existing = create_task("alice")["id"]
    bodies = []
    with checkouts(client) as taken:
        for task_id in (existing, existing + 1000, 0, "not-a-number", 2**64):
            response = client.request(
                method, PATH + suffix.format(id=task_id), headers=auth("bob"), json=body
            )
            assert response.status_code == 403, response.text
            assert response.headers["content-type"].startswith("application/problem+json")
            bodies.append(response.json())
    assert taken == []
    assert all(each == bodies[0] for each in bodies)
    assert bodies[0]["status"] == 403


def test_a_valid_token_does_take_a_pooled_connection(
    client: TestClient, auth: Callable[..., dict[str, str]]
) -> None:
    """What makes `taken == []` in the tests around it mean something."""
    with checkouts(client) as taken:
        response = client.get(PATH, headers=auth("alice"))
    assert response.status_code == 200, response.text
    assert len(taken) == 1


@pytest.mark.parametrize("method", ["GET", "POST"])
def test_token_for_another_user_on_the_collection_is_403(
    client: TestClient, auth: Callable[..., dict[str, str]], method: str
) -> None:
    with checkouts(client) as taken:
        response = client.request(method, PATH, headers=auth("bob"), json={"title": "x"})
    assert response.status_code == 403, response.text
    assert taken == []


# --- issuer and audience -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def iss_aud_client(database: TestDatabase) -> Iterator[TestClient]:
    with app_client(database.settings(jwt_issuer=ISSUER, jwt_audience=AUDIENCE)) as client:
        yield client


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"iss": ISSUER, "aud": AUDIENCE}, id="right"),
        pytest.param({"iss": ISSUER, "aud": ["other", AUDIENCE]}, id="audience-in-list"),
    ],
)
def test_configured_issuer_and_audience_accepted(
    iss_aud_client: TestClient, extra: dict[str, Any]
) -> None:
    response = iss_aud_client.get(PATH, headers=with_bearer(make_token("alice", **extra)))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({"iss": "https://evil.example.com", "aud": AUDIENCE}, id="wrong-issuer"),
        pytest.param({"iss": ISSUER, "aud": "another-api"}, id="wrong-audience"),
        pytest.param({"iss": ISSUER, "aud": ["a", "b"]}, id="audience-list-without-ours"),
        pytest.param({"aud": AUDIENCE}, id="no-issuer"),
        pytest.param({"iss": ISSUER}, id="no-audience"),
    ],
)
def test_wrong_or_missing_issuer_or_audience_is_401(
    iss_aud_client: TestClient, extra: dict[str, Any]
) -> None:
    token = make_token("alice", **extra)
    assert_unauthorized(iss_aud_client.get(PATH, headers=with_bearer(token)), sent=token)


# --- custom user claim ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def uid_client(database: TestDatabase) -> Iterator[TestClient]:
    with app_client(database.settings(jwt_user_claim="uid")) as client:
        yield client


def test_custom_user_claim_names_the_user(uid_client: TestClient) -> None:
    token = make_token("mallory", uid="carol")
    assert uid_client.get("/api/carol/tasks", headers=with_bearer(token)).status_code == 200
    assert uid_client.get("/api/mallory/tasks", headers=with_bearer(token)).status_code == 403


@pytest.mark.parametrize(
    "uid", [pytest.param(None, id="missing"), 7, "", pytest.param({"id": "carol"}, id="object")]
)
def test_custom_user_claim_missing_or_not_a_string_is_401(uid_client: TestClient, uid: Any) -> None:
    token = make_token("carol") if uid is None else make_token("carol", uid=uid)
    assert_unauthorized(uid_client.get("/api/carol/tasks", headers=with_bearer(token)), sent=token)


# --- JWKS ----------------------------------------------------------------------------------------


@dataclass
class SigningKey:
    alg: str
    kid: str
    private: Any
    jwk: dict[str, Any]

    def token(self, user_id: str | None = "alice", **kwargs: Any) -> str:
        kwargs.setdefault("headers", {"kid": self.kid})
        return make_token(user_id, secret=self.private, algorithm=self.alg, **kwargs)


def signing_key(alg: str, kid: str, use: str = "sig") -> SigningKey:
    private: Any
    if alg == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
        public = OKPAlgorithm.to_jwk(private.public_key(), as_dict=True)
    elif alg == "ES256":
        private = ec.generate_private_key(ec.SECP256R1())
        public = ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    else:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        public = RSAAlgorithm.to_jwk(private.public_key(), as_dict=True)
    return SigningKey(alg, kid, private, {**public, "kid": kid, "use": use, "alg": alg})


@dataclass
class JwksServer:
    url: str = ""
    keys: list[dict[str, Any]] = field(default_factory=list)
    hits: int = 0


@contextmanager
def serve_jwks(*keys: SigningKey) -> Iterator[JwksServer]:
    """A JWKS document on 127.0.0.1; change `keys` to change what it serves next."""
    state = JwksServer(keys=[key.jwk for key in keys])

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.hits += 1
            body = json.dumps({"keys": state.keys}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def keys() -> dict[str, SigningKey]:
    return {alg: signing_key(alg, f"{alg.lower()}-1") for alg in ("EdDSA", "ES256", "RS256")}


@pytest.fixture(scope="module")
def jwks(keys: dict[str, SigningKey]) -> Iterator[JwksServer]:
    encryption_key = signing_key("RS256", "enc-1", use="enc")
    with serve_jwks(*keys.values(), encryption_key) as server:
        yield server


@pytest.fixture(scope="module")
def jwks_only(database: TestDatabase, jwks: JwksServer) -> Iterator[TestClient]:
    with app_client(database.settings(jwt_secret=None, jwt_jwks_url=jwks.url)) as client:
        yield client


@pytest.fixture(scope="module")
def secret_and_jwks(database: TestDatabase, jwks: JwksServer) -> Iterator[TestClient]:
    with app_client(database.settings(jwt_jwks_url=jwks.url)) as client:
        yield client


@pytest.fixture(params=["jwks_only", "secret_and_jwks"])
def jwks_client(request: pytest.FixtureRequest) -> TestClient:
    return request.getfixturevalue(request.param)


def rsa_public_pem(key: SigningKey) -> bytes:
    return key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize("alg", ["EdDSA", "ES256", "RS256"])
def test_jwks_token_of_each_algorithm_is_accepted(
    jwks_client: TestClient, keys: dict[str, SigningKey], alg: str
) -> None:
    response = jwks_client.get(PATH, headers=with_bearer(keys[alg].token()))
    assert response.status_code == 200, response.text


def test_secret_still_works_alongside_jwks(secret_and_jwks: TestClient) -> None:
    assert secret_and_jwks.get(PATH, headers=with_bearer(make_token("alice"))).status_code == 200


def test_hs256_is_rejected_when_only_jwks_is_configured(jwks_only: TestClient) -> None:
    token = make_token("alice")
    assert_unauthorized(jwks_only.get(PATH, headers=with_bearer(token)), sent=token)


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda k: k["EdDSA"].token(headers={"kid": "no-such-kid"}), id="unknown-kid"),
        pytest.param(lambda k: k["EdDSA"].token(headers={}), id="no-kid"),
        pytest.param(
            lambda k: hand_signed({"alg": "EdDSA", "kid": 17}, claims(), k["EdDSA"].private.sign),
            id="kid-not-a-string",
        ),
        pytest.param(
            lambda k: make_token(
                "alice", secret=k["RS256"].private, algorithm="RS256", headers={"kid": "enc-1"}
            ),
            id="kid-of-an-encryption-key",
        ),
        pytest.param(
            lambda k: signing_key("EdDSA", "edd-forged").token(headers={"kid": "eddsa-1"}),
            id="known-kid-foreign-key",
        ),
        pytest.param(
            lambda k: k["EdDSA"].token(headers={"kid": "rs256-1"}), id="eddsa-signed-rsa-kid"
        ),
        pytest.param(
            lambda k: make_token(
                "alice", secret=k["ES256"].private, algorithm="ES256", headers={"kid": "eddsa-1"}
            ),
            id="es256-signed-eddsa-kid",
        ),
        pytest.param(
            lambda k: hmac_token(
                {"alg": "HS256", "typ": "JWT", "kid": "rs256-1"},
                claims(),
                rsa_public_pem(k["RS256"]),
            ),
            id="hs256-signed-with-rsa-public-pem",
        ),
        pytest.param(
            lambda k: hmac_token(
                {"alg": "RS256", "typ": "JWT", "kid": "rs256-1"},
                claims(),
                rsa_public_pem(k["RS256"]),
            ),
            id="rs256-header-hmac-signature",
        ),
        pytest.param(lambda k: k["ES256"].token(ttl=-60), id="expired"),
        pytest.param(lambda k: k["RS256"].token(None), id="no-sub"),
        pytest.param(
            lambda k: hand_signed(
                {"alg": "ES384", "kid": "es256-1"}, claims(), lambda _: bytes(96)
            ),
            id="alg-ES384",
        ),
        pytest.param(
            lambda k: make_token(
                "alice", secret=k["RS256"].private, algorithm="PS256", headers={"kid": "rs256-1"}
            ),
            id="alg-PS256",
        ),
    ],
)
def test_bad_jwks_token_is_401(
    jwks_client: TestClient, keys: dict[str, SigningKey], build: Callable[..., str]
) -> None:
    token = build(keys)
    assert_unauthorized(jwks_client.get(PATH, headers=with_bearer(token)), sent=token)


def test_algorithm_outside_the_configured_list_is_rejected(
    database: TestDatabase, jwks: JwksServer, keys: dict[str, SigningKey]
) -> None:
    settings = database.settings(jwt_jwks_url=jwks.url, jwt_algorithms="EdDSA")
    with app_client(settings) as client:
        assert client.get(PATH, headers=with_bearer(keys["EdDSA"].token())).status_code == 200
        for token in (keys["ES256"].token(), keys["RS256"].token(), make_token("alice")):
            assert_unauthorized(client.get(PATH, headers=with_bearer(token)), sent=token)


def test_jwks_key_rotation_is_picked_up_on_unknown_kid(database: TestDatabase) -> None:
    old, new = signing_key("EdDSA", "old"), signing_key("EdDSA", "new")
    cooldown = 0.3
    with serve_jwks(old) as server:
        settings = database.settings(
            jwt_secret=None, jwt_jwks_url=server.url, jwks_refresh_cooldown_seconds=cooldown
        )
        with app_client(settings) as client:
            assert client.get(PATH, headers=with_bearer(old.token())).status_code == 200
            assert server.hits == 1
            server.keys.append(new.jwk)
            time.sleep(cooldown)
            response = client.get(PATH, headers=with_bearer(new.token()))
            assert server.hits == 2
            assert response.status_code == 200, response.text
            assert client.get(PATH, headers=with_bearer(old.token())).status_code == 200


def test_made_up_kids_do_not_refetch_the_jwks_within_the_cooldown(database: TestDatabase) -> None:
    real = signing_key("EdDSA", "real")
    with serve_jwks(real) as server:
        settings = database.settings(
            jwt_secret=None, jwt_jwks_url=server.url, jwks_refresh_cooldown_seconds=60
        )
        with app_client(settings) as client:
            assert client.get(PATH, headers=with_bearer(real.token())).status_code == 200
            for n in range(5):
                forged = signing_key("EdDSA", f"made-up-{n}").token()
                assert_unauthorized(client.get(PATH, headers=with_bearer(forged)), sent=forged)
            assert server.hits == 1


def test_a_key_removed_from_the_jwks_stops_working_when_the_set_expires(
    database: TestDatabase,
) -> None:
    revoked = signing_key("EdDSA", "revoked")
    with serve_jwks(revoked) as server:
        settings = database.settings(
            jwt_secret=None, jwt_jwks_url=server.url, jwks_cache_seconds=0.3
        )
        with app_client(settings) as client:
            token = revoked.token()
            assert client.get(PATH, headers=with_bearer(token)).status_code == 200
            server.keys.clear()
            server.keys.append(signing_key("EdDSA", "replacement").jwk)
            time.sleep(0.4)
            assert_unauthorized(client.get(PATH, headers=with_bearer(token)), sent=token)


def test_jwks_unreachable_is_503_not_401(database: TestDatabase) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/jwks.json"
    token = signing_key("EdDSA", "k").token()
    with app_client(database.settings(jwt_secret=None, jwt_jwks_url=url)) as client:
        response = client.get(PATH, headers=with_bearer(token))
    assert response.status_code == 503, response.text
    assert "retry-after" in response.headers
    assert token not in response.text


# --- start-up -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "secret",
    [
        pytest.param("short", id="5-bytes"),
        pytest.param("x" * 31, id="31-bytes"),
        pytest.param("é" * 15, id="30-bytes-15-chars"),
    ],
)
def test_short_secret_refuses_to_start(database: TestDatabase, secret: str) -> None:
    with (
        pytest.raises(ValueError, match="32"),
        app_client(database.settings(jwt_secret=SecretStr(secret))),
    ):
        pass


@pytest.mark.parametrize(
    "secret",
    [pytest.param("x" * 32, id="32-bytes"), pytest.param("é" * 16, id="32-bytes-16-chars")],
)
def test_secret_of_32_bytes_is_enough(database: TestDatabase, secret: str) -> None:
    with app_client(database.settings(jwt_secret=SecretStr(secret))) as client:
        token = make_token("alice", secret=secret)
        assert client.get(PATH, headers=with_bearer(token)).status_code == 200


def test_no_secret_and_no_jwks_refuses_to_start(database: TestDatabase) -> None:
    with (
        pytest.raises(ValueError, match="JWT_SECRET"),
        app_client(database.settings(jwt_secret=None)),
    ):
        pass


def env_settings(database: TestDatabase) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=SecretStr(database.url),
        app_db_role=database.app_role,
    )


def test_better_auth_secret_is_accepted_as_alias(
    database: TestDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JWT_SECRET", raising=False)
    monkeypatch.setenv("BETTER_AUTH_SECRET", TEST_SECRET)
    settings = env_settings(database)
    assert settings.jwt_secret is not None
    assert settings.jwt_secret.get_secret_value() == TEST_SECRET
    with app_client(settings) as client:
        assert client.get(PATH, headers=with_bearer(make_token("alice"))).status_code == 200


def test_short_better_auth_secret_refuses_to_start(
    database: TestDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("JWT_SECRET", raising=False)
    monkeypatch.setenv("BETTER_AUTH_SECRET", "too-short")
    with pytest.raises(ValueError, match="32"), app_client(env_settings(database)):
        pass


# --- verified tokens, trusted again for a while (JWT_CACHE_SECONDS) -----------------------------


def test_a_remembered_token_still_expires_at_its_exp(database: TestDatabase) -> None:
    with app_client(database.settings(jwt_leeway_seconds=0, jwt_cache_seconds=60)) as client:
        token = make_token("alice", ttl=2)
        headers = {"Authorization": f"Bearer {token}"}
        assert client.get(PATH, headers=headers).status_code == 200  # verified, remembered
        assert client.get(PATH, headers=headers).status_code == 200  # remembered
        time.sleep(max(0.0, jwt_exp(token) - time.time()) + 0.1)
        expired = client.get(PATH, headers=headers)
    assert expired.status_code == 401
    assert expired.json()["detail"] == "The token has expired."


def test_a_remembered_token_is_trusted_only_as_itself(
    client: TestClient, auth: Callable[..., dict[str, str]]
) -> None:
    token = auth("alice")["Authorization"].removeprefix("Bearer ")
    assert client.get(PATH, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    header, payload, signature = token.split(".")
    forged_payload = base64.urlsafe_b64encode(b'{"sub":"alice","exp":9999999999}').rstrip(b"=")
    for forged in (
        f"{header}.{payload}.{signature[:-2]}AA",
        f"{header}.{forged_payload.decode()}.{signature}",
        f"{token}.",
    ):
        response = client.get(PATH, headers={"Authorization": f"Bearer {forged}"})
        assert response.status_code == 401, forged


def test_remembering_is_bounded_and_can_be_turned_off() -> None:
    remembered = VerifiedTokens(60, lambda: None, capacity=2)
    later = time.time() + 600
    for token in ("a", "b", "c"):
        remembered.remember(token, f"user-{token}", valid_until=later)
    assert [remembered.user_of(t) for t in ("a", "b", "c")] == [None, "user-b", "user-c"]
    remembered.remember("d", "user-d", valid_until=time.time() - 1)
    assert remembered.user_of("d") is None
    off = VerifiedTokens(0, lambda: None)
    off.remember("a", "user-a", valid_until=later)
    assert off.user_of("a") is None


def test_a_remembered_token_stops_working_when_a_refresh_drops_its_key(
    database: TestDatabase,
) -> None:
    """Rotation: a token with a new kid refetches the JWKS at once; from then on, a remembered
    token signed with a key the new set lacks is refused, as it would be without the memory."""
    withdrawn, replacement = signing_key("EdDSA", "withdrawn"), signing_key("EdDSA", "new")
    with serve_jwks(withdrawn) as server:
        settings = database.settings(
            jwt_secret=None,
            jwt_jwks_url=server.url,
            jwks_refresh_cooldown_seconds=0,
            jwt_cache_seconds=300,
        )
        with app_client(settings) as client:
            old = withdrawn.token()
            for _ in range(3):  # checked once the key set is known, then remembered
                assert client.get(PATH, headers=with_bearer(old)).status_code == 200
            server.keys[:] = [replacement.jwk]
            new = replacement.token()
            assert client.get(PATH, headers=with_bearer(new)).status_code == 200
            assert_unauthorized(client.get(PATH, headers=with_bearer(old)), sent=old)
            assert client.get(PATH, headers=with_bearer(new)).status_code == 200


def jwt_exp(token: str) -> float:
    payload = token.split(".")[1]
    return float(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])
