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

from ._app import DEMO_SECRET, AppSettings, create_app

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
        help="Redis for --store redis|hybrid (default: $REDIS_URL)",
    )
    parser.add_argument(
        "--secret-key",
        action="append",
        dest="secret_keys",
        help="cookie signing key, repeatable, newest first (default: $SESSION_SECRET_KEYS, "
        "comma-separated; else an insecure demo key)",
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
    if not args.secret_keys:
        from_env = os.environ.get("SESSION_SECRET_KEYS", "")
        args.secret_keys = [key for key in from_env.split(",") if key]
    if any(len(key) < 16 for key in args.secret_keys):
        parser.error("--secret-key: every key must be at least 16 characters long")
    return args


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
