"""The exceptions of `balancer`, one hierarchy:

    BalancerError
    ├── ConfigError .............. a setting is invalid; names it (`.setting`), exits 2
    ├── ListenError .............. a listener cannot bind its address (in use...); exits 1
    ├── TlsError ................. a certificate, key or CA file does not load; names it
    ├── NoBackendAvailable ....... nothing is selectable: the edge answers 503
    ├── InvalidTransition ........ a backend was asked for a state change its state forbids
    ├── UnknownBackend ........... no backend in the pool has that id (admin: 404)
    ├── BackendExists ............ a backend with that URL or id is already in the pool (409)
    └── UpstreamError ............ a backend failed a request (the data path; `.backend_id`)
        ├── UpstreamConnectError . could not connect or send: retryable on another backend (502)
        ├── UpstreamTimeout ...... no connection or no response in time (504)
        └── UpstreamProtocolError  closed early or sent an invalid response (502)

ConfigError is the configuration layer's (`_config`), which names flags. A library class's
constructor (ProxyOptions, Backend, Router, AffinityCookie...) raises a plain ValueError
naming its parameter instead; `_config` checks every value first and names the flag.

Foreign errors (httpx in the health checks and the client transport, tomllib and argparse in
the configuration) are translated into these once, where they are caught; nothing above that
sees them. The service registry's are its own (`service_registry.RegistryError`).
"""

from __future__ import annotations

__all__ = [
    "BackendExists",
    "BalancerError",
    "ConfigError",
    "InvalidTransition",
    "ListenError",
    "NoBackendAvailable",
    "PinnedBackendDown",
    "TlsError",
    "UnknownBackend",
    "UpstreamConnectError",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamTimeout",
]


class BalancerError(Exception):
    """Base of every exception this package raises."""


class ConfigError(BalancerError, ValueError):
    """A setting has an invalid value.

    `setting` is the option as a user spells it on the command line (`--backend`), so the
    same message serves a flag, an environment variable and a TOML key; `str(exc)` is
    `"--backend: <what is wrong>"`.
    """

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(f"{setting}: {message}")
        self.setting = setting
        self.message = message


class ListenError(BalancerError, OSError):
    """A listener (`--listen`, `--admin`) cannot bind its address: in use, not local, not
    permitted. `str(exc)` is ``"--admin 127.0.0.1:8081: cannot listen: <reason>"``; it is an
    `OSError` too, so whoever handled a failed bind before still does."""

    def __init__(self, setting: str, address: str, reason: str) -> None:
        super().__init__(f"{setting} {address}: cannot listen: {reason}")
        self.setting = setting
        self.address = address


class TlsError(BalancerError, ValueError):
    """A TLS file does not load: `setting` is its flag (`--tls-cert`, `--tls-key`,
    `--backend-ca`), `path` the file, `reason` why. `str(exc)` is
    ``"--tls-key /etc/tls/a.key: it is not the key of /etc/tls/a.pem"``. At startup it
    becomes a ConfigError; on a reload nothing changes and it is the answer."""

    def __init__(self, setting: str, path: str, reason: str) -> None:
        super().__init__(f"{setting} {path}: {reason}")
        self.setting = setting
        self.path = path
        self.reason = reason


class NoBackendAvailable(BalancerError):
    """No backend can take this request (none is UP, or every UP one was excluded)."""


class PinnedBackendDown(NoBackendAvailable):
    """`--on-pinned-down strict`: the client's pinned backend is down, and its strict window
    (`retry_after` seconds more, at least 1) is not over: answer 503 with Retry-After
    rather than move the session."""

    def __init__(self, backend_id: str, retry_after: int) -> None:
        super().__init__(f"the pinned backend {backend_id} is down (strict)")
        self.backend_id = backend_id
        self.retry_after = retry_after


class InvalidTransition(BalancerError, RuntimeError):
    """A backend state change was attempted that its current state does not allow."""


class UnknownBackend(BalancerError, LookupError):
    """No backend in the pool has the given id."""

    def __init__(self, backend_id: str) -> None:
        super().__init__(f"no backend with id {backend_id!r}")
        self.backend_id = backend_id

    def __str__(self) -> str:
        # LookupError's str() would quote the message a second time.
        return str(self.args[0])


class BackendExists(BalancerError, ValueError):
    """A backend with the same URL or the same id (name) is already in the pool."""

    def __init__(self, url: str, backend_id: str) -> None:
        super().__init__(f"backend {url} or id {backend_id} is already in the pool")
        self.url = url
        self.backend_id = backend_id


class UpstreamError(BalancerError):
    """A backend failed a request; `backend_id` names it, the message says how."""

    def __init__(self, backend_id: str, message: str) -> None:
        super().__init__(message)
        self.backend_id = backend_id


class UpstreamConnectError(UpstreamError):
    """No connection to the backend (refused, unreachable, reset): nothing was sent."""


class UpstreamTimeout(UpstreamError):
    """The backend did not accept a connection, or did not answer, in time."""


class UpstreamProtocolError(UpstreamError):
    """The backend closed the connection before a complete response, or sent invalid HTTP."""
