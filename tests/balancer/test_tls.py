"""TLS on the listener (issue 17), against a real balancer process on 127.0.0.1 with
certificates made in the test by a private CA (`certs`): requests are proxied over TLS with
X-Forwarded-Proto https, SNI picks the certificate, TLS 1.1 is refused, the affinity cookie
is Secure with the attributes asked for, a reload with a bad file changes nothing, a reload
with a new certificate serves it to new connections while an old keep-alive one goes on,
and a bad file at startup is one line naming the flag and the file. In the process: one
certificate is served without an SNI callback, several are chosen by name, across reloads."""

from __future__ import annotations

import asyncio
import signal
import ssl
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

import httpx
import pytest

from balancer.control._tls import CertificatePair, TlsListener
from tests.balancer.backends import HttpBackend
from tests.balancer.certs import Authority, Leaf
from tests.helpers import async_wait_for, free_port
from tests.processes import balancer

pytestmark = pytest.mark.anyio


@pytest.fixture
def authority(tmp_path: Path) -> Authority:
    return Authority.create(tmp_path / "tls")


@pytest.fixture
async def backend() -> AsyncIterator[HttpBackend]:
    async with HttpBackend("a") as server:
        yield server


def _tls_flags(*leaves: Leaf) -> list[str]:
    flags = []
    for leaf in leaves:
        flags += ["--tls-cert", str(leaf.cert), "--tls-key", str(leaf.key)]
    return flags


def _client_context(authority: Authority) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(authority.cert))
    context.set_alpn_protocols(["http/1.1"])
    return context


async def _served_name(port: int, authority: Authority, sni: str | None) -> str:
    """The common name of the certificate the listener serves to a client asking for `sni`."""
    context = _client_context(authority)
    context.check_hostname = False
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context, server_hostname=sni)
    try:
        cert = writer.get_extra_info("peercert")
        ssl_object = writer.get_extra_info("ssl_object")
        assert ssl_object.selected_alpn_protocol() == "http/1.1"
        return str(dict(rdn[0] for rdn in cert["subject"])["commonName"])
    finally:
        writer.close()


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def test_a_request_is_proxied_over_tls_with_the_cert_sni_picks(
    authority: Authority, backend: HttpBackend
) -> None:
    a = authority.issue("a", "a.test")
    b = authority.issue("b", "b.test", "*.b.test")
    cookie = ["--sticky", "cookie:sid", "--affinity-same-site", "none", "--affinity-partitioned"]
    cookie += ["--affinity-domain", "example.test", "--affinity-path", "/app"]
    with balancer([backend.url], *_tls_flags(a, b), *cookie, admin=False) as (lb, _):
        port = _port(lb.url)
        async with httpx.AsyncClient(verify=_client_context(authority)) as client:
            response = await client.get(f"https://127.0.0.1:{port}/")
        assert response.status_code == 200
        assert response.text == "hello from a"
        seen = {k.lower(): v for k, v in backend.seen[-1].headers}
        assert seen["x-forwarded-proto"] == "https"
        assert "proto=https" in seen["forwarded"]
        set_cookie = response.headers["set-cookie"]
        assert set_cookie.startswith("lb_affinity=")
        attributes = {part.strip() for part in set_cookie.split(";")[1:]}
        assert {"Secure", "HttpOnly", "SameSite=None", "Partitioned"} <= attributes
        assert {"Domain=example.test", "Path=/app"} <= attributes
        # SNI: the exact name, a wildcard one, the default for no name or an unknown one.
        assert await _served_name(port, authority, "a.test") == "a.test"
        assert await _served_name(port, authority, "b.test") == "b.test"
        assert await _served_name(port, authority, "x.b.test") == "b.test"
        assert await _served_name(port, authority, None) == "a.test"
        assert await _served_name(port, authority, "other.test") == "a.test"


async def test_tls_1_1_is_refused(authority: Authority, backend: HttpBackend) -> None:
    a = authority.issue("a", "a.test")
    with balancer([backend.url], *_tls_flags(a), admin=False) as (lb, _):
        context = _client_context(authority)
        context.check_hostname = False
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1_1 is, on purpose
            context.minimum_version = ssl.TLSVersion.TLSv1_1
            context.maximum_version = ssl.TLSVersion.TLSv1_1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # or the client itself will not offer 1.1
        # The server's protocol_version alert, or its reset right after it.
        with pytest.raises((ssl.SSLError, ConnectionResetError)):
            await asyncio.open_connection(
                "127.0.0.1", _port(lb.url), ssl=context, server_hostname="a.test"
            )
        # and 1.2 passes
        context.minimum_version = context.maximum_version = ssl.TLSVersion.TLSv1_2
        _, writer = await asyncio.open_connection(
            "127.0.0.1", _port(lb.url), ssl=context, server_hostname="a.test"
        )
        assert writer.get_extra_info("ssl_object").version() == "TLSv1.2"
        writer.close()


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    """One keep-alive GET / on an open connection: the response's body."""
    writer.write(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    return await asyncio.wait_for(reader.readexactly(length), 5)


async def test_a_reload_serves_the_new_cert_and_a_bad_file_changes_nothing(
    authority: Authority, backend: HttpBackend
) -> None:
    old = authority.issue("a", "a.test")
    with balancer([backend.url], *_tls_flags(old)) as (lb, admin):
        assert admin is not None
        port = _port(lb.url)
        context = _client_context(authority)
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="a.test"
        )
        assert await _get(reader, writer) == b"hello from a"
        good = old.cert.read_bytes()

        # A bad file: 422 naming it, the old certificate still served, still serving.
        old.cert.write_text("not a certificate\n")
        async with httpx.AsyncClient() as client:
            refused = await client.post(admin + "/tls/reload")
        assert refused.status_code == 422
        assert str(old.cert) in refused.json()["error"]
        assert "--tls-cert" in refused.json()["error"]
        assert await _served_name(port, authority, "a.test") == "a.test"
        assert await _get(reader, writer) == b"hello from a"

        # A new certificate for new names under the same paths, then SIGUSR1.
        old.cert.write_bytes(good)
        new = authority.issue("new", "a.test", "renewed.test")
        old.cert.write_bytes(new.cert.read_bytes())
        old.key.write_bytes(new.key.read_bytes())
        lb.popen.send_signal(signal.SIGUSR1)

        async def renewed() -> bool:
            context = _client_context(authority)
            context.check_hostname = False
            _, probe = await asyncio.open_connection(
                "127.0.0.1", port, ssl=context, server_hostname="renewed.test"
            )
            names = probe.get_extra_info("peercert")["subjectAltName"]
            probe.close()
            return ("DNS", "renewed.test") in names

        await async_wait_for(renewed, 5, "the renewed certificate")
        # The connection opened before the reload goes on, on its own session.
        assert await _get(reader, writer) == b"hello from a"
        writer.close()
        async with httpx.AsyncClient() as client:
            answer = await client.post(admin + "/tls/reload")
        assert answer.status_code == 200
        assert "renewed.test" in answer.json()["certificates"]


async def _names_served(port: int, authority: Authority, connections: int) -> set[str]:
    """The DNS names of the certificates served to `connections` new connections."""
    context = _client_context(authority)
    context.check_hostname = False
    names: set[str] = set()
    for _ in range(connections):
        _, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="a.test"
        )
        names |= {value for _, value in writer.get_extra_info("peercert")["subjectAltName"]}
        writer.close()
    return names


async def test_sigusr1_to_the_parent_reloads_every_balancer_process(
    authority: Authority, backend: HttpBackend
) -> None:
    old = authority.issue("a", "a.test")
    with balancer([backend.url], *_tls_flags(old), "--workers", "2", admin=False) as (lb, _):
        port = _port(lb.url)
        # SO_REUSEPORT spreads new connections over both processes: 20 reach each one with
        # a probability of 1 - 2 * 2**-20.
        assert "renewed.test" not in await _names_served(port, authority, 20)
        new = authority.issue("new", "a.test", "renewed.test")
        old.cert.write_bytes(new.cert.read_bytes())
        old.key.write_bytes(new.key.read_bytes())
        lb.popen.send_signal(signal.SIGUSR1)

        async def every_one_renewed() -> bool:
            context = _client_context(authority)
            context.check_hostname = False
            for _ in range(20):
                _, writer = await asyncio.open_connection(
                    "127.0.0.1", port, ssl=context, server_hostname="a.test"
                )
                names = writer.get_extra_info("peercert")["subjectAltName"]
                writer.close()
                if ("DNS", "renewed.test") not in names:
                    return False
            return True

        await async_wait_for(every_one_renewed, 5, "both processes to serve the new certificate")


class TlsBackend(HttpBackend):
    """`HttpBackend` over TLS, serving `leaf`: an https:// backend."""

    def __init__(self, name: str, leaf: Leaf) -> None:
        super().__init__(name)
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(leaf.cert, leaf.key)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def __aenter__(self) -> TlsBackend:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self


async def _backend_state(admin: str) -> str:
    async with httpx.AsyncClient() as client:
        backends = (await client.get(admin + "/backends")).json()["backends"]
    return str(backends[0]["state"])


@pytest.mark.parametrize("trusted", [True, False])
async def test_an_https_backend_is_verified_with_backend_ca_and_refused_without(
    authority: Authority, trusted: bool
) -> None:
    leaf = authority.issue("backend", "backend.test")
    # A check may take a second: a TLS handshake on a loaded CI machine has taken longer
    # than 0.2 s, and with fall 1 one slow check marked the trusted backend down. The
    # untrusted case does not wait on the timeout: verification fails at once.
    flags = ["--health-interval", "1", "--health-timeout", "1", "--health-fall", "1"]
    flags += ["--max-attempts", "1"]
    if trusted:
        flags += ["--backend-ca", str(authority.cert)]
    async with TlsBackend("s", leaf) as server:
        with balancer([server.url], *flags) as (lb, admin):
            assert admin is not None
            async with httpx.AsyncClient() as client:
                response = await client.get(lb.url + "/")
            if trusted:
                assert response.status_code == 200
                assert response.text == "hello from s"
                assert "/" in [seen.target for seen in server.seen]
                # The health checks verify alike: they reach it, and it stays up.
                await server.wait_seen(2)
                assert "/healthz" in [seen.target for seen in server.seen]
                assert await _backend_state(admin) == "up"
            else:
                # Its certificate is not trusted: nothing reached it but handshakes.
                assert response.status_code in (502, 503)
                assert server.seen == []

                async def down() -> bool:
                    return await _backend_state(admin) == "down"

                await async_wait_for(down, 10, "the health checks to mark it down")
                assert server.seen == []


def _start(*flags: str) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, "-m", "balancer", "--listen", f"127.0.0.1:{free_port()}"]
    args += ["--backend", "http://127.0.0.1:9", *flags]
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize(
    ("case", "flag", "why"),
    [
        ("missing cert", "--tls-cert", "cannot read it: No such file"),
        ("missing key", "--tls-key", "cannot read it: No such file"),
        ("not a cert", "--tls-cert", "holds no PEM certificate"),
        ("other key", "--tls-key", "it is not the key of"),
        ("no key", "--tls-key", "1 --tls-cert but 0 --tls-key"),
        ("cert as key", "--tls-key", "not a PEM private key"),
        ("encrypted key", "--tls-key", "the key is encrypted"),
        ("key as CA", "--backend-ca", "holds no PEM certificate"),
    ],
)
def test_a_bad_tls_file_is_one_line_naming_the_flag_and_file(
    authority: Authority, case: str, flag: str, why: str
) -> None:
    a = authority.issue("a", "a.test")
    b = authority.issue("b", "b.test")
    cert, key = str(a.cert), str(a.key)
    if case == "missing cert":
        cert = str(authority.directory / "missing.pem")
    elif case == "missing key":
        key = str(authority.directory / "missing.key")
    elif case == "not a cert":
        cert = key  # a key where the certificate should be
    elif case == "other key":
        key = str(b.key)
    elif case == "cert as key":
        key = cert
    elif case == "encrypted key":
        key = str(authority.directory / "encrypted.key")
        subprocess.run(
            ["openssl", "ec", "-in", str(a.key), "-aes256", "-passout", "pass:x", "-out", key],
            check=True,
            capture_output=True,
        )
    flags = ["--tls-cert", cert] + ([] if case == "no key" else ["--tls-key", key])
    if case == "key as CA":
        flags = ["--backend-ca", key]
    result = _start(*flags)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"balancer: error: {flag}")
    assert why in lines[0]
    if case != "no key":
        assert (cert if flag == "--tls-cert" else key) in lines[0]  # the file it names


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--affinity-same-site", "none"], "--affinity-same-site: none needs a Secure cookie"),
        (["--affinity-partitioned"], "--affinity-partitioned: needs a Secure cookie"),
        (["--affinity-domain", "a b"], "--affinity-domain: 'a b' is not a domain name"),
        (["--affinity-path", "app"], "--affinity-path: expected an absolute path"),
    ],
)
def test_cookie_attributes_that_need_secure_are_refused_without_it(
    flags: list[str], message: str
) -> None:
    result = _start(*flags)
    assert result.returncode == 2
    assert result.stderr.strip() == f"balancer: error: {message}" or message in result.stderr
    assert "Traceback" not in result.stderr


async def test_sigusr1_without_tls_is_logged_and_changes_nothing(backend: HttpBackend) -> None:
    with balancer([backend.url], admin=False) as (lb, _):
        lb.popen.send_signal(signal.SIGUSR1)
        async with httpx.AsyncClient() as client:

            async def answered() -> bool:
                lb.alive()  # fails the test, with its output, if the signal stopped it
                return (await client.get(lb.url + "/")).status_code == 200

            await async_wait_for(answered, 5, "an answer after SIGUSR1")
        lb.popen.send_signal(signal.SIGTERM)
        lb.popen.wait(15)
        output = lb.output()
        assert "tls_reload_failed" in output
        assert "no --tls-cert" in output


async def test_a_handshake_that_never_comes_is_closed_after_the_header_timeout(
    authority: Authority, backend: HttpBackend
) -> None:
    a = authority.issue("a", "a.test")
    flags = [*_tls_flags(a), "--header-timeout", "0.5"]
    with balancer([backend.url], *flags, admin=False) as (lb, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", _port(lb.url))
        started = asyncio.get_running_loop().time()
        # A client that connects and sends no ClientHello: closed by the server, not held.
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert asyncio.get_running_loop().time() - started < 3
        writer.close()


async def test_plain_http_to_the_tls_listener_gets_a_400_that_says_so(
    authority: Authority, backend: HttpBackend
) -> None:
    a = authority.issue("a", "a.test")
    with balancer([backend.url], *_tls_flags(a), admin=False) as (lb, _):
        async with httpx.AsyncClient() as client:
            response = await client.get(f"http://127.0.0.1:{_port(lb.url)}/")
        assert response.status_code == 400
        assert "This port speaks HTTPS" in response.text
        assert response.headers["connection"] == "close"


def _handshake_names(context: ssl.SSLContext, authority: Authority, sni: str) -> set[str]:
    """The DNS names of the certificate a handshake with `context` serves to a client
    asking for `sni` (both ends in memory, a real handshake)."""
    client = ssl.create_default_context(cafile=str(authority.cert))
    client.check_hostname = False
    bios = [ssl.MemoryBIO() for _ in range(4)]
    ours = client.wrap_bio(bios[0], bios[1], server_hostname=sni)
    theirs = context.wrap_bio(bios[2], bios[3], server_side=True)
    done = [False, False]
    for _ in range(10):  # TLS 1.3: two flights each way at most
        for i, end in enumerate((ours, theirs)):
            if not done[i]:
                try:
                    end.do_handshake()
                    done[i] = True
                except ssl.SSLWantReadError:
                    pass
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())
        if all(done):
            break
    assert all(done), "the handshake did not end"
    cert = ours.getpeercert()
    assert cert is not None
    names = cast("tuple[tuple[str, str], ...]", cert["subjectAltName"])
    return {value for kind, value in names if kind == "DNS"}


def test_one_certificate_is_served_without_a_choice_and_a_reload_swaps_it(
    authority: Authority,
) -> None:
    leaf = authority.issue("a", "a.test")
    tls = TlsListener([CertificatePair(leaf.cert, leaf.key)])
    # Nothing to choose: no SNI callback into Python a handshake.
    assert tls.context.sni_callback is None
    assert _handshake_names(tls.context, authority, "a.test") == {"a.test"}
    renewed = authority.issue("renewed", "renewed.test")
    leaf.cert.write_bytes(renewed.cert.read_bytes())
    leaf.key.write_bytes(renewed.key.read_bytes())
    tls.reload()
    assert tls.context.sni_callback is None
    assert _handshake_names(tls.context, authority, "a.test") == {"renewed.test"}


def test_several_certificates_are_chosen_by_name_before_and_after_a_reload(
    authority: Authority,
) -> None:
    a, b = authority.issue("a", "a.test"), authority.issue("b", "b.test")
    tls = TlsListener([CertificatePair(a.cert, a.key), CertificatePair(b.cert, b.key)])
    front = tls.context
    assert _handshake_names(front, authority, "b.test") == {"b.test"}
    assert _handshake_names(front, authority, "other.test") == {"a.test"}  # the default
    renewed = authority.issue("renewed", "b.test", "renewed.test")
    b.cert.write_bytes(renewed.cert.read_bytes())
    b.key.write_bytes(renewed.key.read_bytes())
    tls.reload()
    assert tls.context is front  # the callback reads the new certificates
    assert _handshake_names(front, authority, "b.test") == {"b.test", "renewed.test"}
