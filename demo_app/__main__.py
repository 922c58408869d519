"""``python -m demo_app --port P --instance-id NAME --store memory|redis|hybrid [--chaos]``."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from types import FrameType

import uvicorn

from redis_plumbing import RedisURLError, parse_redis_url
from service_registry import Instance, RegistryError

from ._app import DEMO_SECRET, STORE_TIMEOUT, AppSettings, create_app

logger = logging.getLogger("demo_app")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 1-65535, not {port}")
    return port


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m demo_app", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1)")
    parser.add_argument("--port", type=_port, required=True, help="port to listen on")
    parser.add_argument("--instance-id", required=True, help="name shown in every response")
    parser.add_argument("--store", choices=["memory", "redis", "hybrid"], default="memory")
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL"),
        help="Redis for --store redis|hybrid (default: $REDIS_URL): redis://, rediss://, "
        "redis+sentinel://HOST:PORT,.../MASTER, redis+cluster://HOST:PORT,... "
        "(docs/session_store.md)",
    )
    parser.add_argument(
        "--min-replicas-ack",
        type=int,
        default=0,
        metavar="N",
        help="with --store redis|hybrid: answer a session write only once N replicas have it "
        "(Redis WAIT), else 503; 0 is off (docs/session_store.md)",
    )
    parser.add_argument(
        "--ack-timeout-ms",
        type=int,
        default=500,
        metavar="MS",
        help="with --min-replicas-ack: how long a write waits for the replicas (500)",
    )
    parser.add_argument(
        "--secret-key",
        action="append",
        dest="secret_keys",
        help="cookie signing key, repeatable, newest first (default: $SESSION_SECRET_KEYS, "
        "comma-separated; else an insecure demo key)",
    )
    parser.add_argument(
        "--registry",
        metavar="URL",
        help="announce this instance in the service registry at this Redis URL "
        "(redis://HOST:PORT/DB, or any form --redis-url takes; docs/registry.md)",
    )
    parser.add_argument(
        "--advertise",
        metavar="URL",
        help="with --registry: where callers reach this instance (default http://HOST:PORT)",
    )
    parser.add_argument("--service", default="demo", help="with --registry: the service (demo)")
    parser.add_argument(
        "--registry-ttl",
        type=float,
        default=3.0,
        metavar="S",
        help="with --registry: seconds without a heartbeat before the instance counts as dead",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning"])
    parser.add_argument("--access-log", action="store_true", help="log every request")
    parser.add_argument(
        "--chaos",
        action="store_true",
        help="for tests of a supervisor: crash (exit 70) at a random moment 1 to 3 seconds "
        "after starting to serve, like the classic Node cluster demo; never on by default",
    )
    args = parser.parse_args(argv)
    if args.store != "memory" and not args.redis_url:
        parser.error(f"--store {args.store} needs --redis-url (or REDIS_URL in the environment)")
    if args.store != "memory":
        try:
            parse_redis_url(args.redis_url)
        except RedisURLError as exc:
            parser.error(f"--redis-url: {exc}")
    if not args.secret_keys:
        from_env = os.environ.get("SESSION_SECRET_KEYS", "")
        args.secret_keys = [key for key in from_env.split(",") if key]
    if any(len(key) < 16 for key in args.secret_keys):
        parser.error("--secret-key: every key must be at least 16 characters long")
    _check_acks(parser, args)
    _check_registry(parser, args)
    return args


def _check_acks(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit 2 naming the flag for acknowledgement options that cannot work."""
    if args.min_replicas_ack < 0:
        parser.error(f"--min-replicas-ack: must be 0 (off) or more, not {args.min_replicas_ack}")
    if args.min_replicas_ack and args.store == "memory":
        parser.error("--min-replicas-ack: needs --store redis or hybrid (memory has no replicas)")
    if args.min_replicas_ack and not 0 < args.ack_timeout_ms < STORE_TIMEOUT * 1000:
        parser.error(
            f"--ack-timeout-ms: must be 1 to {int(STORE_TIMEOUT * 1000) - 1} (below the "
            f"store's {STORE_TIMEOUT} s timeout), not {args.ack_timeout_ms}"
        )


def _check_registry(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit 2 naming the flag for a registry option that cannot work."""
    if args.registry is None:
        if args.advertise is not None:
            parser.error("--advertise: needs --registry URL")
        return
    try:
        parse_redis_url(args.registry)
    except RedisURLError as exc:
        parser.error(f"--registry: {exc}")
    if args.advertise is None:
        host = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        args.advertise = f"http://{host}:{args.port}"
    try:
        Instance(
            service=args.service,
            id=args.instance_id,
            address=args.advertise,
            ttl=args.registry_ttl,
        )
    except RegistryError as exc:
        flag = "--registry-ttl" if "ttl" in str(exc) else "--advertise"
        if str(exc).startswith("service"):
            flag = "--service"
        elif str(exc).startswith("instance id"):
            flag = "--instance-id"
        parser.error(f"{flag}: {exc}")


def _stopped_already(signum: int, frame: FrameType | None) -> None:
    pass


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if not args.secret_keys:
        logger.warning("no --secret-key given: using the insecure demo key")
    settings = AppSettings(
        instance_id=args.instance_id,
        store=args.store,
        redis_url=args.redis_url,
        secret_keys=tuple(args.secret_keys or [DEMO_SECRET]),
        chaos=args.chaos,
        registry_url=args.registry,
        service=args.service,
        advertise=args.advertise,
        registry_ttl=args.registry_ttl,
        min_replicas_ack=args.min_replicas_ack,
        ack_timeout_ms=args.ack_timeout_ms,
    )
    config = uvicorn.Config(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        access_log=args.access_log,
        # SIGTERM: stop accepting, let in-flight requests finish, then exit 0.
        timeout_graceful_shutdown=10,
        server_header=False,
    )
    server = uvicorn.Server(config)
    # uvicorn re-raises the signal it stopped for once it is done, with the handler
    # that was there before it: make that one a no-op, so that a graceful stop
    # exits 0 rather than die of the signal after the fact.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stopped_already)
    server.run()
    if not server.started:
        sys.exit(1)  # could not bind, or the lifespan failed: uvicorn has said why


if __name__ == "__main__":
    main()
