"""Real Redis topologies for tests: a Redis Cluster, and a TLS-only server with an ACL user.

Every process is a real server binary on a free 127.0.0.1 port, without persistence, in a
temp dir of its own, and dies with the test run (PR_SET_PDEATHSIG, as `RedisServer`
does); teardown kills it.

    with start_cluster() as cluster:               # 3 primaries + 3 replicas
        client = redis_client(cluster.url)         # redis+cluster://...
        victim = cluster.primary_of(key)
        cluster.kill(victim)                       # SIGKILL, as a crash
        cluster.wait_promoted(victim)              # its replica took its slots over

    with TLSServer(tmp_path) as server:            # its own CA, TLS only, user "app"
        store = RedisStore.from_url(server.tls_url())  # rediss://app:...@127.0.0.1:P/0?ssl_ca_certs=

The cluster is made with the cluster commands themselves (CLUSTER ADDSLOTSRANGE, MEET,
REPLICATE), as ``redis-cli --cluster create`` does, so it needs no CLI binary.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import redis

from redis_plumbing import RedisServer, find_server_binary
from tests.helpers import StartStop, free_port, wait_for

__all__ = ["SLOTS", "Cluster", "TLSServer", "make_certificates", "start_cluster"]

HOST = "127.0.0.1"
SLOTS = 16384


def _admin(port: int) -> redis.Redis:
    """A plain synchronous client for setting up and inspecting one node."""
    return redis.Redis(
        HOST, port, socket_timeout=2, socket_connect_timeout=2, decode_responses=True
    )


def _call(port: int, *args: str | int) -> object:
    with _admin(port) as client:
        return client.execute_command(*args)


class Cluster(StartStop):
    """Six nodes: ``primaries[i]`` owns a third of the slots, ``replicas[i]`` follows it.

    ``node_timeout`` (ms) is the cluster's ``cluster-node-timeout``: a killed primary is
    failed over by its replica about one to two of them later. Full coverage is not
    required (``cluster-require-full-coverage no``): while one shard fails over, the others
    keep serving, as a session store wants.
    """

    def __init__(self, *, node_timeout: int = 1000, binary: str | None = None) -> None:
        self.binary = binary or find_server_binary()
        args = (
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout),
            "--cluster-require-full-coverage", "no",
            "--cluster-announce-ip", HOST,
            # A full resync right away, not after the default 5 s wait for more replicas.
            "--repl-diskless-sync-delay", "0",
        )  # fmt: skip

        def node() -> RedisServer:
            # The bus port would default to port + 10000: name a free one instead.
            bus = ("--cluster-port", str(free_port()))
            return RedisServer(self.binary, extra_args=(*args, *bus))

        self.primaries = [node() for _ in range(3)]
        self.replicas = [node() for _ in range(3)]
        self.ids: dict[int, str] = {}  # port -> cluster node id

    @property
    def nodes(self) -> list[RedisServer]:
        return [*self.primaries, *self.replicas]

    @property
    def url(self) -> str:
        """``redis+cluster://`` naming every node (any one would do as a seed)."""
        return "redis+cluster://" + ",".join(f"{HOST}:{node.port}" for node in self.nodes)

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            self.ids[node.port] = str(_call(node.port, "CLUSTER", "MYID"))
        share = SLOTS // len(self.primaries)
        for index, primary in enumerate(self.primaries):
            first = index * share
            last = SLOTS - 1 if index == len(self.primaries) - 1 else first + share - 1
            _call(primary.port, "CLUSTER", "ADDSLOTSRANGE", first, last)
            # Distinct epochs from the start, as redis-cli does: no collision to resolve.
            _call(primary.port, "CLUSTER", "SET-CONFIG-EPOCH", index + 1)
        seed = self.primaries[0].port
        for node in self.nodes[1:]:
            bus = node.extra_args[node.extra_args.index("--cluster-port") + 1]
            _call(seed, "CLUSTER", "MEET", HOST, node.port, bus)
        wait_for(self._all_met, timeout, "every node to know the five others")
        for primary, replica in zip(self.primaries, self.replicas, strict=True):
            _call(replica.port, "CLUSTER", "REPLICATE", self.ids[primary.port])
        wait_for(self._ready, timeout, "the cluster to be ok with every replica in sync")

    def _all_met(self) -> bool:
        for node in self.nodes:
            text = str(_call(node.port, "CLUSTER", "NODES"))
            lines = [line for line in text.splitlines() if line]
            if len(lines) != len(self.nodes) or any("handshake" in line for line in lines):
                return False
        return True

    def _ready(self) -> bool:
        for node in self.nodes:
            with _admin(node.port) as client:
                if "cluster_state:ok" not in str(client.execute_command("CLUSTER", "INFO")):
                    return False
        for replica in self.replicas:
            with _admin(replica.port) as client:
                if client.info("replication").get("master_link_status") != "up":
                    return False
        return True

    def primary_of(self, key: str) -> RedisServer:
        """The running node that owns ``key``'s slot now, by the cluster's own map."""
        slot = int(str(_call(self.running()[0].port, "CLUSTER", "KEYSLOT", key)))
        return self.owner(slot)

    def owner(self, slot: int) -> RedisServer:
        for node in self.running():
            with _admin(node.port) as client:
                for first, last, master, *_ in client.execute_command("CLUSTER", "SLOTS"):
                    if first <= slot <= last:
                        return self._by_port(int(master[1]))
        raise AssertionError(f"no node owns slot {slot}")

    def _by_port(self, port: int) -> RedisServer:
        for node in self.nodes:
            if node.port == port:
                return node
        raise AssertionError(f"port {port} is not a node of this cluster")

    def running(self) -> list[RedisServer]:
        return [node for node in self.nodes if node.running]

    def current_primaries(self) -> list[RedisServer]:
        """The running nodes that are primaries now (a promoted replica included)."""
        found = []
        for node in self.running():
            with _admin(node.port) as client:
                if client.info("replication").get("role") == "master":
                    found.append(node)
        return found

    def replica_of(self, primary: RedisServer) -> RedisServer:
        node_id = self.ids[primary.port]
        for node in self.running():
            with _admin(node.port) as client:
                info = client.info("replication")
                if info.get("role") == "slave" and info.get("master_port") == primary.port:
                    return node
        raise AssertionError(f"{primary!r} ({node_id}) has no running replica")

    def kill(self, node: RedisServer) -> None:
        """SIGKILL the node, as a crash would."""
        node.kill()

    def wait_promoted(self, replica: RedisServer, timeout: float = 20.0) -> None:
        """Wait until ``replica`` is a primary and every running node's map says so."""

        def promoted() -> bool:
            with _admin(replica.port) as client:
                if client.info("replication").get("role") != "master":
                    return False
            for node in self.running():
                with _admin(node.port) as client:
                    if "cluster_state:ok" not in str(client.execute_command("CLUSTER", "INFO")):
                        return False
            return True

        wait_for(promoted, timeout, f"{replica!r} to take over its primary's slots")

    def rejoin(self, node: RedisServer, primary: RedisServer, timeout: float = 20.0) -> None:
        """Start a killed ``node`` again on its ports, empty, as a replica of ``primary``.

        What an operator (or a StatefulSet's start script) does after a failover: until
        then the promoted primary has no replica, and writes that must reach one
        (``min_replicas_ack``) cannot be acknowledged on its shard.
        """
        node.start()
        self.ids[node.port] = str(_call(node.port, "CLUSTER", "MYID"))
        bus = primary.extra_args[primary.extra_args.index("--cluster-port") + 1]
        _call(node.port, "CLUSTER", "MEET", HOST, primary.port, bus)

        def knows_primary() -> bool:
            return self.ids[primary.port] in str(_call(node.port, "CLUSTER", "NODES"))

        wait_for(knows_primary, timeout, f"{node!r} to meet the cluster")
        _call(node.port, "CLUSTER", "REPLICATE", self.ids[primary.port])

        def in_sync() -> bool:
            with _admin(node.port) as client:
                return bool(client.info("replication").get("master_link_status") == "up")

        wait_for(in_sync, timeout, f"{node!r} to sync as a replica of {primary!r}")

    def stop(self) -> None:
        for node in self.nodes:
            node.kill()

    def __repr__(self) -> str:
        return f"<Cluster primaries={[n.port for n in self.primaries]}>"


@contextlib.contextmanager
def start_cluster(*, node_timeout: int = 1000) -> Iterator[Cluster]:
    """A running 3 + 3 cluster for the ``with`` block; killed afterwards."""
    with Cluster(node_timeout=node_timeout) as cluster:
        yield cluster


# -- TLS --------------------------------------------------------------------------------------


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


def make_certificates(directory: Path, name: str = "ca") -> tuple[Path, Path, Path]:
    """A CA of its own and a server certificate it signed for 127.0.0.1 and localhost.

    Returns (ca.pem, server.pem, server.key). Uses the ``openssl`` CLI (the ``cryptography``
    package is not a dependency of the project). A second call with another ``name`` makes
    an unrelated CA, for the wrong-CA test.
    """
    if shutil.which("openssl") is None:
        raise RuntimeError("the TLS tests need the openssl CLI (apt-get install openssl)")
    ca_key, ca = directory / f"{name}.key", directory / f"{name}.pem"
    key, request = directory / f"{name}-server.key", directory / f"{name}-server.csr"
    cert = directory / f"{name}-server.pem"
    ext = directory / f"{name}-server.ext"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-subj", f"/CN=test {name}", "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
             "-keyout", str(key), "-out", str(request))  # fmt: skip
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _openssl("x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-days", "2", "-extfile", str(ext), "-out", str(cert))  # fmt: skip
    return ca, cert, key


class TLSServer(RedisServer):
    """A TLS-only ``redis-server`` (no plaintext port) whose one enabled user is ``user``.

    A `RedisServer` (start, readiness wait, stop, cleanup) with TLS arguments and a
    readiness check over TLS. The default user is off, so every client must authenticate as
    ``user``/``password``. Needs a redis-server built with TLS (Debian's is; the embedded
    Valkey is not): raises RuntimeError otherwise, and `start()` a RedisServerError with the
    server's own words when the binary lacks TLS.
    """

    def __init__(self, directory: Path, *, user: str = "app", password: str = "s3cret-pw") -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError(
                "the TLS tests need a TLS-enabled redis-server on PATH (apt-get install "
                "redis-server; scripts/install does it); the embedded Valkey has no TLS"
            )
        super().__init__(binary, host=HOST)
        self.user, self.password = user, password
        self.ca, self.cert, self.key = make_certificates(directory)
        # `--port 0` after RedisServer's own `--port`: the last one wins, so the only
        # listener is the TLS one, on `self.port`.
        self.extra_args = (
            "--port", "0",
            "--tls-port", str(self.port),
            "--tls-cert-file", str(self.cert),
            "--tls-key-file", str(self.key),
            "--tls-ca-cert-file", str(self.ca),
            "--tls-auth-clients", "no",
            "--user", "default", "off",
            "--user", user, "on", f">{password}", "~*", "&*", "+@all",
        )  # fmt: skip

    def tls_url(self, *, password: str | None = None, ca: Path | None = None) -> str:
        secret = self.password if password is None else password
        return f"rediss://{self.user}:{secret}@{HOST}:{self.port}/0?ssl_ca_certs={ca or self.ca}"

    def _answers_ping(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.ca))
        try:
            with (
                socket.create_connection((HOST, self.port), timeout=0.5) as raw,
                context.wrap_socket(raw, server_hostname=HOST) as sock,
            ):
                sock.sendall(b"PING\r\n")
                return sock.recv(64)[:1] in (b"+", b"-")  # -NOAUTH: up, and ours
        except OSError:
            return False
