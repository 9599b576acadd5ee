"""HTTP to Vault / OpenBao: authentication, failover across addresses, error translation.

Every request goes through :meth:`VaultTransport.call`, which

* logs in when there is no token yet (AppRole or Kubernetes) and logs in again once when the
  token turns out to be expired or revoked;
* on connection errors, 5xx, sealed and standby answers, moves to the next address of
  ``HMD_VAULT_ADDR`` with bounded retries and exponential backoff — for idempotent calls only;
  a non-idempotent call is only sent again when the first attempt certainly never reached a
  server (connection refused);
* translates every failure into :mod:`heimdall.errors`. Tokens, role ids, secret ids and
  JWTs never appear in a message;
* counts its HTTP requests (``calls``: every attempt, retries and failovers included), which the
  bench reads; the calls heimdall makes are counted once each by the provider seam
  (:class:`heimdall.kms.provider.KeyProvider`).

The connections themselves (proxies, TLS, pools) are :mod:`heimdall.kms.vault_http`'s.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from heimdall.errors import (
    AccessDenied,
    ConfigurationError,
    DecryptionFailed,
    HeimdallError,
    KeyNotFound,
    KeyVersionDisabled,
    KmsError,
    KmsUnavailable,
)
from heimdall.kms.vault_config import VaultAuthMethod, VaultSettings
from heimdall.kms.vault_http import UNREACHABLE, Answer, cause, connections, never_sent

__all__ = ["VaultTransport", "error_for_message"]

PROVIDER = "vault"
_RETRYABLE_STATUS = frozenset({429, 472, 473, 500, 502, 503, 504})


_MESSAGE_TYPES: tuple[tuple[str, type[KmsError] | None], ...] = (
    ("disallowed by policy", KeyVersionDisabled),
    ("too old", KeyVersionDisabled),
    ("encryption key not found", KeyNotFound),
    ("no existing key named", KeyNotFound),
    ("key not found", KeyNotFound),
    ("invalid key version", KeyNotFound),
    ("permission denied", AccessDenied),
    ("message authentication failed", None),
    ("invalid ciphertext", None),
    ("unable to decode", None),
    ("invalid ciphertext length", None),
)


def error_for_message(message: str, key_identifier: str = "") -> HeimdallError:
    """Translate one Transit error message (e.g. a batch item's) into heimdall's tree."""
    lowered = message.lower()
    for needle, error_type in _MESSAGE_TYPES:
        if needle in lowered:
            if error_type is None:
                return DecryptionFailed()
            if error_type is KeyVersionDisabled:
                return KeyVersionDisabled(
                    "the key version is below the key's min_decryption_version",
                    provider=PROVIDER,
                    key_identifier=key_identifier,
                )
            return error_type(
                f"vault refused the operation: {needle}",
                provider=PROVIDER,
                key_identifier=key_identifier,
            )
    return KmsError("vault refused the operation", provider=PROVIDER, key_identifier=key_identifier)


def _messages(answer: Answer) -> list[str]:
    errors = (answer.object() or {}).get("errors")
    return [str(e) for e in errors] if isinstance(errors, list) else []


class VaultTransport:
    """Sends authenticated requests to the first healthy address of a Vault cluster."""

    def __init__(
        self,
        settings: VaultSettings,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self._sleep = sleep
        self._connect()
        self._bases = [address.rstrip("/") for address in settings.addresses]
        self._headers: dict[str, str] = {
            "Content-Type": "application/json",
            "X-Vault-Request": "true",  # Vault's SSRF guard (agents may require it)
        }
        if settings.namespace:
            self._headers["X-Vault-Namespace"] = settings.namespace
        self._active = 0
        self._token: str | None = settings.token
        if settings.auth is VaultAuthMethod.TOKEN and not self._token:
            raise ConfigurationError(
                "Vault token authentication needs HMD_VAULT_TOKEN or VAULT_TOKEN"
            )
        self.calls = 0
        self.failovers = 0

    def _connect(self) -> None:
        """Connections to every address, for this process."""
        self._pools = [connections(address, self.settings) for address in self.settings.addresses]
        self._pid = os.getpid()

    @property
    def active_address(self) -> str:
        return self.settings.addresses[self._active]

    # -- authentication -------------------------------------------------------------------

    def _login_body(self) -> tuple[str, dict[str, str]]:
        s = self.settings
        if s.auth is VaultAuthMethod.APPROLE:
            role_id = s.role_id or _read_secret(s.role_id_file, "HMD_VAULT_ROLE_ID")
            secret_id = s.secret_id or _read_secret(s.secret_id_file, "HMD_VAULT_SECRET_ID")
            return f"auth/{s.approle_mount}/login", {"role_id": role_id, "secret_id": secret_id}
        if not s.kubernetes_role:
            raise ConfigurationError("Kubernetes authentication needs HMD_VAULT_K8S_ROLE")
        jwt = _read_secret(s.kubernetes_jwt_path, "the service-account token")
        return f"auth/{s.kubernetes_mount}/login", {"role": s.kubernetes_role, "jwt": jwt}

    def login(self) -> None:
        """Obtain a token with the configured method (no-op for token auth)."""
        if self.settings.auth is VaultAuthMethod.TOKEN:
            return
        path, body = self._login_body()
        response = self._send("POST", path, body, idempotent=True, authenticated=False)
        if response.status != 200:
            raise AccessDenied(
                f"vault {self.settings.auth.value} login was refused",
                provider=PROVIDER,
            )
        token = ((response.object() or {}).get("auth") or {}).get("client_token")
        if not isinstance(token, str) or not token:
            raise AccessDenied(
                f"vault {self.settings.auth.value} login answered without a token",
                provider=PROVIDER,
            )
        self._token = token

    def _token_is_valid(self) -> bool:
        response = self._send("GET", "auth/token/lookup-self", None, idempotent=True)
        return response.status == 200

    # -- requests -------------------------------------------------------------------------

    def call(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None = None,
        *,
        idempotent: bool = True,
        key_identifier: str = "",
        partial_ok: bool = False,
    ) -> dict[str, Any]:
        """The JSON body of a successful answer (``{}`` for 204), or a translated error.

        With *partial_ok*, a 400 answer that carries ``batch_results`` is returned as it is,
        so the caller can report each item's error against its own field.
        """
        if self._token is None:
            self.login()
        response = self._send(method, path, body, idempotent=idempotent)
        if (
            response.status == 403
            and self.settings.auth is not VaultAuthMethod.TOKEN
            and not self._token_is_valid()
        ):
            self.login()  # the token expired or was revoked: log in again, once
            response = self._send(method, path, body, idempotent=idempotent)
        return self._result(response, key_identifier, partial_ok)

    def _result(self, response: Answer, key_identifier: str, partial_ok: bool) -> dict[str, Any]:
        status = response.status
        if status == 204:
            return {}
        if status == 200:
            payload = response.object()
            if payload is None:
                raise KmsError("vault answered HTTP 200 without a JSON object", provider=PROVIDER)
            return payload
        messages = _messages(response)
        if status == 400 and partial_ok:
            payload = response.object() or {}
            if isinstance(payload.get("data"), dict) and "batch_results" in payload["data"]:
                return payload
        if status == 403:
            raise AccessDenied(
                "vault denied the operation (permission denied)",
                provider=PROVIDER,
                key_identifier=key_identifier,
            )
        if status == 404:
            raise KeyNotFound(
                "vault has no such key or path", provider=PROVIDER, key_identifier=key_identifier
            )
        if messages:
            raise error_for_message(messages[0], key_identifier)
        raise KmsError(f"vault answered HTTP {status}", provider=PROVIDER)

    def _send(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        *,
        idempotent: bool,
        authenticated: bool = True,
    ) -> Answer:
        """One request, failing over across addresses. Returns any non-retryable answer."""
        if self._pid != os.getpid():  # a forked child must not share the parent's sockets
            self._connect()
        last: str = "no address answered"
        count = len(self._pools)
        headers = self._headers
        if authenticated and self._token:
            headers = {**headers, "X-Vault-Token": self._token}
        data = None if body is None else orjson.dumps(body)
        for attempt in range(self.settings.attempts):
            start = self._active
            for offset in range(count):
                index = (start + offset) % count
                address = self.settings.addresses[index]
                self.calls += 1
                try:
                    raw = self._pools[index].urlopen(
                        method, f"{self._bases[index]}/v1/{path}", body=data, headers=headers
                    )
                    response = Answer(raw.status, raw.data)
                except UNREACHABLE as exc:
                    error = cause(exc)
                    if not idempotent and not never_sent(error):
                        raise KmsUnavailable(
                            "vault connection failed mid-request; the operation may or may "
                            "not have happened",
                            provider=PROVIDER,
                        ) from None
                    last = f"{type(error).__name__} from {address}"
                    continue
                if response.status in _RETRYABLE_STATUS:
                    last = f"HTTP {response.status} from {address}"
                    # A standby/sealed answer means the request was not carried out.
                    if not idempotent and response.status not in {429, 472, 473, 503}:
                        raise KmsUnavailable(
                            f"vault failed the request ({last})", provider=PROVIDER
                        )
                    continue
                if index != self._active:
                    self._active = index
                    self.failovers += 1
                return response
            if attempt + 1 < self.settings.attempts:
                self._sleep(self.settings.backoff_seconds * 2**attempt)
        raise KmsUnavailable(f"vault is unavailable: {last}", provider=PROVIDER)

    def node_states(self) -> list[tuple[str, str]]:
        """Each address and what its sys/health says: active, standby, sealed, unreachable."""
        states = []
        for address, base, pool in zip(
            self.settings.addresses, self._bases, self._pools, strict=True
        ):
            try:
                raw = pool.urlopen(
                    "GET",
                    f"{base}/v1/sys/health?standbyok=true&perfstandbyok=true",
                    headers=self._headers,
                )
            except UNREACHABLE:
                states.append((address, "unreachable"))
                continue
            try:
                body = orjson.loads(raw.data) if raw.data else {}
            except orjson.JSONDecodeError:
                body = {}
            if not isinstance(body, dict):
                body = {}
            if body.get("sealed"):
                state = "sealed"
            elif body.get("standby"):
                state = "performance standby" if body.get("performance_standby") else "standby"
            elif raw.status == 200:
                state = "active"
            else:
                state = f"HTTP {raw.status}"
            states.append((address, state))
        return states

    def __repr__(self) -> str:
        return f"VaultTransport(addresses={self.settings.addresses!r})"


def _read_secret(path: Path | None, what: str) -> str:
    if path is None:
        raise ConfigurationError(f"{what} is not configured")
    try:
        value = Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {what} from {path}: {exc.strerror}") from None
    if not value:
        raise ConfigurationError(f"{path} is empty")
    return value
