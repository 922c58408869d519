"""``python -m demo_app.caller --registry URL --service demo --requests N``: peer-to-peer calls.

Calls the demo service through `balancer.transport.BalancedTransport`, with no balancer process in
between: the instances come from the service registry, each request goes to one of them
(``--balance``), and the caller prints which instance answered, then a count per instance.
With ``--balance hash --key K`` every request carries the session key K and goes where the
balancer (``--sticky cookie:sid``) would send a client whose session cookie is K.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from collections.abc import Sequence

import httpx

from balancer.transport import BalancedTransport
from redis_plumbing import RedisURLError, parse_redis_url
from service_registry import Registry, RegistryError

__all__ = ["main"]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m demo_app.caller", description=__doc__)
    parser.add_argument(
        "--registry",
        required=True,
        metavar="URL",
        help="redis://HOST:PORT/DB, or redis+sentinel://, redis+cluster:// (docs/registry.md)",
    )
    parser.add_argument("--service", default="demo", help="the service to call (demo)")
    parser.add_argument("--requests", type=_positive, default=10, metavar="N", help="(10)")
    parser.add_argument(
        "--balance", choices=["round-robin", "least-inflight", "p2c", "hash"], default="p2c"
    )
    parser.add_argument("--key", help="with --balance hash: the session key (cookie sid)")
    parser.add_argument("--path", default="/api/session", help="what to GET (/api/session)")
    args = parser.parse_args(argv)
    try:
        parse_redis_url(args.registry)
    except RedisURLError as exc:
        parser.error(f"--registry: {exc}")
    if args.key is not None and args.balance != "hash":
        parser.error("--key: needs --balance hash")
    return args


async def call(args: argparse.Namespace) -> int:
    registry = Registry.from_url(args.registry, args.service)
    transport = BalancedTransport(registry, balance=args.balance, hash_on="cookie:sid")
    answered: Counter[str] = Counter()
    failed = 0
    cookies = {"sid": args.key} if args.key else None
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url=f"http://{args.service}", cookies=cookies, timeout=5
        ) as client:
            for n in range(1, args.requests + 1):
                try:
                    response = await client.get(args.path)
                    instance = response.json().get("instance", "?")
                    print(f"{n:4d}  {response.status_code}  {instance}  {response.url}")
                    answered[str(instance)] += 1
                except (httpx.HTTPError, ValueError) as exc:
                    failed += 1
                    print(f"{n:4d}  failed: {exc}")
    finally:
        await transport.aclose()
        await registry.aclose()
    summary = ", ".join(f"{name} {count}" for name, count in sorted(answered.items()))
    print(f"answered by: {summary or 'nobody'}; failed: {failed}")
    return 0 if failed == 0 else 1


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        code = asyncio.run(call(args))
    except RegistryError as exc:
        print(f"caller: {exc}", file=sys.stderr)
        code = 1
    sys.exit(code)


if __name__ == "__main__":
    main()
