"""The ``executor-tornado`` command line.

Example::

    executor-tornado serve --port 8080
    executor-tornado config
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

from executor_tornado import cli_admin, cli_keys, cli_tasks
from executor_tornado.cli_admin import AdminError, load_settings
from executor_tornado.settings import Settings
from store import StoreError

__all__ = ["main"]

log = logging.getLogger("executor_tornado")


async def _serve(settings: Settings) -> None:
    """Serve until SIGTERM or SIGINT, telling systemd about each state change.

    ``READY=1`` is sent once the port is bound and the store answered a
    ping, ``STOPPING=1`` when the signal arrives; watchdog pings run from
    ready until the shutdown has finished.
    """
    from executor_tornado.app import Service
    from executor_tornado.notify import Notifier

    notifier = Notifier.from_environment()
    service = Service(settings)
    await service.start()
    try:
        await service.store.ping()
    except StoreError:
        await service.stop(0)
        raise

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    log.info(
        "executor-tornado listening on http://%s:%d (public URL %s, store %s, OAuth %s)",
        host,
        service.port,
        service.base_url,
        settings.masked()["store_url"],
        "configured" if settings.issuer_url else "not configured",
    )
    notifier.notify("READY=1", f"STATUS=Serving on {service.base_url}", f"MAINPID={os.getpid()}")
    notifier.start_watchdog()

    await stop.wait()
    grace = settings.shutdown_grace_seconds
    log.info("Shutting down: waiting up to %.1f s for requests in progress", grace)
    notifier.notify("STOPPING=1", f"STATUS=Draining requests for up to {grace:g} s")
    try:
        await service.stop(grace)
    finally:
        await notifier.stop_watchdog()
    log.info("Stopped")


def _cmd_serve(args: argparse.Namespace) -> int:
    settings = load_settings(host=args.host, port=args.port)
    from executor_tornado.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    try:
        asyncio.run(_serve(settings))
    except StoreError as exc:
        raise AdminError(f"Cannot open the store {settings.masked()['store_url']}: {exc}") from None
    except OSError as exc:
        raise AdminError(f"Cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}") from None
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    settings = load_settings()
    print(json.dumps(settings.masked(), indent=2, sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="executor-tornado", description="Self-hosted MCP service on Tornado")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", help="listen address (overrides EXECUTOR_HOST)")
    serve.add_argument("--port", type=int, help="listen port (overrides EXECUTOR_PORT)")
    serve.set_defaults(func=_cmd_serve)

    config = commands.add_parser("config", help="print the effective settings with secrets masked")
    config.set_defaults(func=_cmd_config)
    cli_admin.add_commands(commands)
    cli_keys.add_commands(commands)
    cli_tasks.add_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AdminError as exc:
        print(f"executor-tornado: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
