#!/usr/bin/env python3
"""Create the accounts, workspaces and API keys a seed file lists; safe to run again.

Run it with the service's environment (the same EXECUTOR_DATA_DIR or
EXECUTOR_STORE_URL, MCP_API_KEY_SECRET and EXECUTOR_PUBLIC_URL), from cron
or a deploy pipeline. It prints a JSON report of what it created, updated,
left unchanged and revoked; a new key is written to its ``output`` file
(mode 0600) or, without one, printed in the report once. Errors print one
line and exit 1 without changing the store.

Example::

    EXECUTOR_DATA_DIR=/var/lib/executor-tornado scripts/seed.py scripts/seed.example.yaml
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from executor_tornado.cli_admin import AdminError, load_settings, run_command, with_store
from executor_tornado.cli_keys import api_keys_for
from executor_tornado.seeding import SeedError, apply_seed, load_seed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="seed.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("seed_file", type=Path, help="JSON (.json) or YAML seed file")
    args = parser.parse_args(argv)

    def command() -> dict:
        try:
            seed = load_seed(args.seed_file)
            api_keys = api_keys_for(load_settings())

            async def apply(store):
                return await apply_seed(store, api_keys, seed, now=time.time())

            return with_store(apply).to_json()
        except SeedError as exc:
            raise AdminError(str(exc)) from None

    return run_command(command)


if __name__ == "__main__":
    sys.exit(main())
