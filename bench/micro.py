"""In-process micro benchmarks: anonymous token issuance against raw ES256 signing, and the rate-limit check on SQLite.

Prints one JSON object (figure name -> formatted value) as its last line.
Each loop runs single-threaded for ``--seconds`` and reports the median of
three runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from executor_tornado.clock import SystemClock
from executor_tornado.identity import issue_anonymous_identity
from executor_tornado.keys import AnonymousSigner
from executor_tornado.ratelimit import RateLimiter
from executor_tornado.settings import Settings
from store.sqlite import SQLiteStore


def rate_of(operation: Callable[[], object], seconds: float) -> float:
    count = 0
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    while time.perf_counter() < deadline:
        for _ in range(50):
            operation()
        count += 50
    return count / (time.perf_counter() - started)


async def async_rate_of(operation: Callable[[], Awaitable[object]], seconds: float, concurrency: int = 1) -> float:
    count = 0
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal count
        while time.perf_counter() < deadline:
            await operation()
            count += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return count / (time.perf_counter() - started)


def median_rate(measure: Callable[[], float]) -> float:
    return statistics.median(measure() for _ in range(3))


async def main(seconds: float) -> dict[str, str]:
    private_key = ec.generate_private_key(ec.SECP256R1())
    clock = SystemClock()
    signer = AnonymousSigner(private_key, issuer="http://127.0.0.1", ttl_seconds=3600, clock=clock)
    sample, _ = signer.issue_anonymous("anon_bench")
    signing_input = sample.rsplit(".", 1)[0].encode()

    raw = median_rate(lambda: rate_of(lambda: private_key.sign(signing_input, ec.ECDSA(hashes.SHA256())), seconds))
    issued = median_rate(lambda: rate_of(lambda: signer.issue_anonymous("anon_bench"), seconds))

    figures: dict[str, str] = {
        "raw ES256 signatures/s (cryptography, one thread)": f"{raw:,.0f}",
        "anonymous token JWTs signed/s (AnonymousSigner.issue_anonymous)": f"{issued:,.0f} ({issued / raw:.0%} of raw)",
    }

    with tempfile.TemporaryDirectory() as directory:
        store = SQLiteStore(str(Path(directory) / "bench.db"))
        await store.open()
        try:
            identities = []
            for _ in range(3):
                identities.append(await async_rate_of(lambda: issue_anonymous_identity(store, signer, clock), seconds))
            identity_rate = statistics.median(identities)
            figures["anonymous identities/s incl. SQLite account write (one at a time)"] = (
                f"{identity_rate:,.0f} ({identity_rate / raw:.0%} of raw)"
            )

            settings = Settings(_env_file=None, data_dir=Path(directory))
            limiter = RateLimiter(store, settings, clock)
            users = iter(range(10**9))

            async def check() -> None:
                decision = await limiter.check_route("/v1/mcp/anonymous", "127.0.0.1", f"bench-{next(users) % 64}", per_minute=10**8)
                assert decision.allowed

            for concurrency in (1, 16):
                rates = [await async_rate_of(check, seconds, concurrency) for _ in range(3)]
                rate = statistics.median(rates)
                figures[f"rate-limit checks/s on SQLite, {concurrency} concurrent"] = f"{rate:,.0f} ({1e6 / rate:,.0f} µs per check)"
        finally:
            await store.close()
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of one timed loop, in seconds")
    arguments = parser.parse_args()
    print(json.dumps(asyncio.run(main(arguments.seconds))))
