"""A real Redis Sentinel setup for tests: one primary, one replica, three sentinels.

Every process is the server binary `find_server_binary()` finds (a sentinel is the same
binary with ``--sentinel``), on a free 127.0.0.1 port, without persistence, in a temp dir
of its own (a sentinel rewrites its config file as it learns), and dies with the test run
(PR_SET_PDEATHSIG: `redis_plumbing.parent_death_hook`). Timings are cut so that a failover
takes a second or two: ``down-after-milliseconds`` 500, ``failover-timeout`` 2000.

The replica reaches the primary through `Link`, a TCP relay in the test process, so that a
test can hold the replication stream back (`Link.hold`) as a slow or broken network would:
on loopback a replica is otherwise never behind long enough for a crash to catch it.

    with SentinelSetup() as setup:
        client = redis_client(setup.url)        # redis+sentinel://.../mymaster
        setup.link.hold()                       # the primary goes on alone
        old = setup.kill_primary()              # SIGKILL, as a crash
        setup.wait_failover(old)                # the sentinels name the replica
        setup.rejoin(old)                       # back, empty, as a replica of the new one
        wait_for(lambda: setup.linked(old))     # ... and synced
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

import redis

from redis_plumbing import RedisServer, find_server_binary, parent_death_hook
from tests.helpers import StartStop, free_port, wait_for

__all__ = ["Link", "SentinelSetup", "acknowledged", "info", "query"]

HOST = "127.0.0.1"
# A full resync right away, not after the default 5 s wait for more replicas.
_NODE_ARGS = ("--repl-diskless-sync-delay", "0", "--replica-announce-ip", HOST)


def query(port: int, *args: str) -> object:
    """Send one command to 127.0.0.1:``port`` on a connection of its own and return the reply
    as the server sent it (text, lists, None), parsed by redis-py's RESP reader with none of
    its per-command reply callbacks (PING stays "PONG", INFO stays text). An error reply
    raises redis.ResponseError; a server that cannot be reached, OSError."""
    connection = redis.Connection(  # type: ignore[no-untyped-call]  # redis-py
        host=HOST, port=port, socket_timeout=1.0, socket_connect_timeout=1.0,
        decode_responses=True, protocol=2,  # RESP2: a map is a flat list, as callers read it
    )  # fmt: skip
    try:
        connection.send_command(*args)  # type: ignore[no-untyped-call]  # redis-py
        return connection.read_response()
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise OSError(f"{HOST}:{port}: {exc}") from exc
    finally:
        connection.disconnect()  # type: ignore[no-untyped-call]  # redis-py


def info(port: int, section: str = "replication") -> dict[str, str]:
    text = query(port, "INFO", section)
    assert isinstance(text, str)
    fields = (line.partition(":") for line in text.splitlines() if ":" in line)
    return {key: value for key, _, value in fields}


def acknowledged(port: int, replicas: int = 1) -> bool:
    """Whether ``replicas`` replicas of the primary at 127.0.0.1:``port`` confirm a write
    within 100 ms (WAIT). A replica whose link says "up" may not yet: after a full sync
    the primary streams to it only from its next acknowledgement, and one that came before
    the primary saw the sync end is dropped, so the next comes a second later."""
    client = redis.Redis(HOST, port, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        with client.pipeline(transaction=False) as pipe:  # one connection: WAIT counts the SET
            pipe.set("test:acknowledged", 1)
            pipe.wait(replicas, 100)
            _, confirmed = pipe.execute()
        return int(confirmed) >= replicas
    except (redis.ConnectionError, redis.TimeoutError):
        return False
    finally:
        client.close()


class Link:
    """A TCP relay from the replica to the primary whose primary-to-replica direction a
    test can hold back: bytes are kept, not delivered, until `release()`, and dropped if
    the primary's side closes first (a crash while the network was slow). Replica-to-
    primary bytes (the replica's acknowledgements) always pass. One thread, one selector.
    """

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server((HOST, 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._held = threading.Event()
        self._stopped = threading.Event()
        self._pending: dict[socket.socket, bytearray] = {}  # replica side -> held bytes
        self._thread = threading.Thread(target=self._run, name="replication-link", daemon=True)
        self._thread.start()

    def hold(self) -> None:
        self._held.set()

    def release(self) -> None:
        self._held.clear()

    @property
    def held_bytes(self) -> int:
        return sum(len(b) for b in list(self._pending.values()))

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        selector.register(self._listener, selectors.EVENT_READ, None)
        peers: dict[socket.socket, socket.socket] = {}
        while not self._stopped.is_set():
            # The timeout only paces the check of `release()` and `stop()`.
            for key, _ in selector.select(timeout=0.02):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    self._accept(selector, peers)
                    continue
                other = peers.get(sock)
                if other is None:
                    continue
                try:
                    data = sock.recv(65536)
                except OSError:
                    data = b""
                if not data:
                    for end in (sock, other):
                        selector.unregister(end)
                        peers.pop(end, None)
                        self._pending.pop(end, None)
                        end.close()
                    continue
                if key.data == "down" and (self._held.is_set() or self._pending.get(other)):
                    self._pending.setdefault(other, bytearray()).extend(data)
                else:
                    with contextlib.suppress(OSError):
                        other.sendall(data)
            if not self._held.is_set():
                for replica_side, buffered in list(self._pending.items()):
                    with contextlib.suppress(OSError):
                        replica_side.sendall(buffered)
                    del self._pending[replica_side]
        for sock in [*peers, self._listener]:
            sock.close()
        selector.close()

    def _accept(
        self, selector: selectors.BaseSelector, peers: dict[socket.socket, socket.socket]
    ) -> None:
        replica_side, _ = self._listener.accept()
        try:
            primary_side = socket.create_connection((HOST, self.target_port), timeout=1.0)
        except OSError:
            replica_side.close()  # the primary is gone: the replica sees a refused link
            return
        for sock in (replica_side, primary_side):
            sock.setblocking(True)
            sock.settimeout(1.0)
        peers[replica_side], peers[primary_side] = primary_side, replica_side
        selector.register(replica_side, selectors.EVENT_READ, "up")
        selector.register(primary_side, selectors.EVENT_READ, "down")

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(5)


class _Sentinel:
    """One sentinel process, with the config file it owns."""

    def __init__(self, binary: str, master_name: str, primary_port: int, timings: str) -> None:
        self.port = free_port()
        self._dir = tempfile.TemporaryDirectory(prefix="session-store-sentinel-")
        config = Path(self._dir.name) / "sentinel.conf"
        config.write_text(
            f"port {self.port}\n"
            f"bind {HOST}\n"
            "daemonize no\n"
            f'dir "{self._dir.name}"\n'
            f"sentinel announce-ip {HOST}\n"
            f"sentinel monitor {master_name} {HOST} {primary_port} 2\n"
            f"{timings}"
        )
        self.process = subprocess.Popen(
            [binary, str(config), "--sentinel", "--loglevel", "warning"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,  # its events are read with SENTINEL commands instead
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=parent_death_hook(),  # noqa: PLW1509
        )

    def answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"sentinel on {self.port} exited with {self.process.returncode}")
        try:
            return query(self.port, "PING") == "PONG"
        except OSError:
            return False

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._dir.cleanup()


class SentinelSetup(StartStop):
    """One primary, one replica and three sentinels (quorum 2), all real processes.

    `start()` returns when the replica is in sync and every sentinel knows the replica and
    the two other sentinels, so that a failover can be agreed on at once. `stop()` kills
    everything; usable as a context manager.
    """

    def __init__(
        self,
        *,
        master_name: str = "mymaster",
        down_after_ms: int = 500,
        failover_timeout_ms: int = 2000,
        binary: str | None = None,
    ) -> None:
        self.binary = binary or find_server_binary()
        self.master_name = master_name
        self._timings = (
            f"sentinel down-after-milliseconds {master_name} {down_after_ms}\n"
            f"sentinel failover-timeout {master_name} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {master_name} 1\n"
        )
        self.primary = RedisServer(self.binary, extra_args=_NODE_ARGS)
        self.link = Link(self.primary.port)
        self.replica = RedisServer(
            self.binary, extra_args=(*_NODE_ARGS, "--replicaof", HOST, str(self.link.port))
        )
        self.sentinels: list[_Sentinel] = []

    @property
    def url(self) -> str:
        """The ``redis+sentinel://`` URL of the setup (`redis_plumbing.redis_client` reads it)."""
        nodes = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{nodes}/{self.master_name}"

    @property
    def sentinel_addresses(self) -> list[tuple[str, int]]:
        return [(HOST, s.port) for s in self.sentinels]

    def start(self, timeout: float = 20.0) -> None:
        self.primary.start()
        self.replica.start()
        wait_for(lambda: self.in_sync(self.replica, self.primary), timeout, "the replica to sync")
        self.sentinels = [
            _Sentinel(self.binary, self.master_name, self.primary.port, self._timings)
            for _ in range(3)
        ]
        for sentinel in self.sentinels:
            wait_for(sentinel.answers, timeout, f"sentinel {sentinel.port} to answer")
        wait_for(self._sentinels_agree, timeout, "the sentinels to know each other")

    def _sentinels_agree(self) -> bool:
        for sentinel in self.sentinels:
            fields = query(sentinel.port, "SENTINEL", "MASTER", self.master_name)
            assert isinstance(fields, list)
            state = dict(zip(fields[::2], fields[1::2], strict=True))
            if state.get("num-other-sentinels") != "2" or state.get("num-slaves") != "1":
                return False
        return True

    def master_port(self) -> int | None:
        """The primary's port as the sentinels say it (the first that answers)."""
        for sentinel in self.sentinels:
            with contextlib.suppress(OSError):
                reply = query(
                    sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name
                )
                if isinstance(reply, list) and len(reply) == 2:
                    return int(str(reply[1]))
        return None

    def current_primary(self) -> RedisServer:
        port = self.master_port()
        for server in (self.primary, self.replica):
            if server.port == port:
                return server
        raise AssertionError(f"the sentinels name port {port}, none of ours")

    def current_replica(self) -> RedisServer:
        primary = self.current_primary()
        return self.replica if primary is self.primary else self.primary

    def in_sync(self, replica: RedisServer, primary: RedisServer) -> bool:
        """The replica is linked to its primary and has all of its stream."""
        if not (replica.running and primary.running):
            return False
        try:
            mine = info(replica.port)
            theirs = info(primary.port)
        except OSError:
            return False
        return mine.get("master_link_status") == "up" and mine.get(
            "slave_repl_offset"
        ) == theirs.get("master_repl_offset")

    def linked(self, replica: RedisServer) -> bool:
        """The replica has loaded its primary's data and follows its stream."""
        if not replica.running:
            return False
        try:
            return info(replica.port).get("master_link_status") == "up"
        except OSError:
            return False

    def kill_primary(self) -> RedisServer:
        """SIGKILL the current primary, as a crash would; returns it."""
        primary = self.current_primary()
        primary.kill()
        return primary

    def wait_failover(self, old: RedisServer, timeout: float = 15.0) -> RedisServer:
        """Wait until every sentinel names another primary than ``old``; returns it."""

        def switched() -> bool:
            ports = set()
            for sentinel in self.sentinels:
                reply = query(
                    sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.master_name
                )
                assert isinstance(reply, list)
                ports.add(int(str(reply[1])))
            return len(ports) == 1 and old.port not in ports

        wait_for(switched, timeout, "the sentinels to promote the replica")
        return self.current_primary()

    def rejoin(self, old: RedisServer) -> None:
        """Start the killed node again on its port, empty, as a replica of the new primary;
        returns once it answers PING (`linked` says when it has synced).

        What a StatefulSet or a sentinel-aware start script does: ask the sentinels who the
        primary is and replicate from it. (A node started as a lone primary would be turned
        into a replica by the sentinels too, but only after about 8 to 18 s of their timers.)
        Call it from the main thread: the node gets SIGTERM when the thread that started
        it ends (PR_SET_PDEATHSIG), and an executor's thread may end first.
        """
        primary = self.current_primary()
        assert primary is not old
        old.extra_args = (*_NODE_ARGS, "--replicaof", HOST, str(primary.port))
        old.start()

    def stop(self) -> None:
        for sentinel in self.sentinels:
            sentinel.stop()
        self.replica.stop()
        self.primary.stop()
        self.link.stop()

    def __repr__(self) -> str:
        return (
            f"<SentinelSetup {self.master_name} primary={self.primary.port} "
            f"replica={self.replica.port} sentinels={[s.port for s in self.sentinels]}>"
        )
