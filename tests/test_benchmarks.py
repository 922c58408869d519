"""The benchmarks that need no outside programs still run (the others need wrk, nginx and
HAProxy, and take minutes: they are run by hand, never timed in tests); benchmarks/proxy.py
refuses bad flags, and reads what h2load says, the protocol it negotiated first (one second
of h2load against a real nginx, where h2load and nginx are installed)."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import proxy
from redis_plumbing import free_port

_ROOT = Path(__file__).resolve().parent.parent


def _data_path(*args: str, plain: bool = False) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "BALANCER_PLAIN"}
    if plain:
        env["BALANCER_PLAIN"] = "1"
    return subprocess.run(
        [sys.executable, str(_ROOT / "benchmarks" / "data_path.py"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=_ROOT,
        env=env,
    )


def test_data_path_benchmark_prints_a_figure_for_its_build() -> None:
    done = _data_path("--requests", "300", plain=True)
    assert done.returncode == 0, done.stderr
    found = re.fullmatch(r"data path, plain Python: ([\d.]+) us a request \(.*\)\n", done.stdout)
    assert found is not None, done.stdout
    assert float(found.group(1)) > 0


def test_data_path_benchmark_refuses_a_bad_count() -> None:
    done = _data_path("--requests", "0")
    assert done.returncode == 2
    assert "--requests" in done.stderr


@pytest.mark.parametrize("flag", ["--h2-streams", "--h2-clients", "--duration"])
def test_proxy_benchmark_refuses_a_bad_count(flag: str) -> None:
    done = subprocess.run(
        [sys.executable, str(_ROOT / "benchmarks" / "proxy.py"), "--http2", flag, "0"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=_ROOT,
    )
    assert done.returncode == 2
    assert f"{flag} must be at least 1" in done.stderr


@pytest.mark.skipif(
    shutil.which("h2load") is None or shutil.which("nginx") is None,
    reason="h2load (nghttp2-client) and nginx are the --http2 benchmark's",
)
def test_http2_table_names_the_protocol_h2load_negotiated(
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = argparse.Namespace(h2_clients=2, h2_streams=2, duration=1.0, quick=True, rounds=1)
    nginx = shutil.which("nginx") or "nginx"
    results = {}
    with proxy.cluster() as c:
        backend = free_port()
        conf = c.write("backend.conf", proxy.backend_config(c.tmp, [backend]))
        c.start([nginx, "-c", str(conf), "-p", str(c.tmp), "-e", "stderr"], backend, None)
        cert, key, _ = proxy._tls_files(c)
        # nginx with h2 on, then a second one offering only http/1.1 (as the balancer did
        # before it spoke HTTP/2): h2load falls back to HTTP/1.1 there.
        for name, http2 in (("nginx 1 worker", proxy.nginx_http2(nginx)), ("no h2", ("", ""))):
            port = free_port()
            text = proxy.nginx_tls_config(c.tmp, port, [backend], cert, key, http2=http2)
            text = text.replace("nginx-proxy", f"nginx-{port}")  # its own pid file
            conf = c.write(f"tls-{port}.conf", text)
            p = c.start([nginx, "-c", str(conf), "-p", str(c.tmp), "-e", "stderr"], port, None)
            results[name] = proxy.cpu_per_request(
                p,
                lambda: proxy.run_h2load(port, 1.0, args, cpu=None, name=name),  # noqa: B023
            )
    h2, h1 = results["nginx 1 worker"], results["no h2"]
    assert (h2.protocol, h1.protocol) == ("h2", "http/1.1")
    for result in (h2, h1):
        assert min(result.requests, result.rps, result.cpu_us, result.mean_ms) > 0, result
        assert result.errors == "", result
    proxy.print_http2(results, args)
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line}
    assert rows["nginx"].split()[5] == "1.00"  # nginx 1 worker h2 REQ/S X-NGINX ...
    assert "negotiated http/1.1, not HTTP/2: no ratio" in rows["no"]
