"""Rate limits over real HTTP, with an injected clock instead of sleeps."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from pathlib import Path

import pytest
from tornado.httpclient import AsyncHTTPClient, HTTPRequest

from conftest import anonymous_key, fetch, json_body, running
from executor_tornado.clock import ManualClock
from executor_tornado.ratelimit import client_ip, parse_networks

TOKEN = "/auth/anonymous/token"


async def post_token(service, **headers: str):
    return await fetch(service, TOKEN, method="POST", headers=headers)


async def test_31st_token_request_is_429_and_retry_after_is_true(data_dir: Path) -> None:
    clock = ManualClock(start=time.time())
    async with running(data_dir, clock=clock) as service:
        for attempt in range(30):
            response = await post_token(service)
            assert response.code == 200, attempt
        rejected = await post_token(service)
        assert rejected.code == 429
        assert json_body(rejected) == {"error": "Rate limit exceeded"}
        retry_after = int(rejected.headers["Retry-After"])
        assert retry_after == 2, "30 per minute refills one token every 2 seconds"

        clock.advance(retry_after - 0.5)
        assert (await post_token(service)).code == 429, "not before Retry-After"
        clock.advance(0.5)
        assert (await post_token(service)).code == 200, "admitted once Retry-After has passed"


async def test_concurrent_requests_never_exceed_capacity(data_dir: Path) -> None:
    clock = ManualClock(start=time.time())
    async with running(data_dir, clock=clock) as service:
        client = AsyncHTTPClient(force_instance=True, max_clients=200)
        try:
            requests = [
                client.fetch(HTTPRequest(service.base_url + TOKEN, method="POST", body=b"", request_timeout=60), raise_error=False)
                for _ in range(200)
            ]
            responses = await asyncio.gather(*requests)
        finally:
            client.close()
        codes = [response.code for response in responses]
        assert codes.count(200) == 30
        assert codes.count(429) == 170


async def test_forged_forwarding_headers_from_untrusted_peer(data_dir: Path) -> None:
    clock = ManualClock(start=time.time())
    async with running(data_dir, clock=clock) as service:
        for _ in range(30):
            assert (await post_token(service)).code == 200
        for header in ("X-Forwarded-For", "X-Real-IP", "CF-Connecting-IP"):
            response = await post_token(service, **{header: "203.0.113.7"})
            assert response.code == 429, header


async def test_trusted_proxy_forwarding_is_honoured(data_dir: Path) -> None:
    clock = ManualClock(start=time.time())
    async with running(data_dir, clock=clock, trusted_proxies=["127.0.0.1/32"]) as service:
        for _ in range(30):
            assert (await post_token(service, **{"X-Forwarded-For": "203.0.113.7"})).code == 200
        assert (await post_token(service, **{"X-Forwarded-For": "203.0.113.7"})).code == 429
        assert (await post_token(service, **{"X-Forwarded-For": "203.0.113.8"})).code == 200
        spoofed = {"X-Forwarded-For": "198.51.100.1, 203.0.113.7"}
        assert (await post_token(service, **spoofed)).code == 429, "only the rightmost untrusted hop counts"


async def test_user_agent_rotation_hits_ip_ceiling(data_dir: Path) -> None:
    clock = ManualClock(start=time.time())
    async with running(data_dir, clock=clock) as service:
        admitted = 0
        for index in range(130):
            response = await post_token(service, **{"User-Agent": f"agent-{index}"})
            if response.code == 200:
                admitted += 1
            else:
                assert response.code == 429
                assert int(response.headers["Retry-After"]) >= 1
        assert admitted == 120, "four times the per-agent capacity of 30"


async def test_mcp_route_limit_precedes_auth(data_dir: Path) -> None:
    clock = ManualClock(start=time.time())
    async with running(data_dir, clock=clock) as service:
        for _ in range(120):
            response = await fetch(service, "/v1/mcp/anonymous?workspaceId=ws_1", method="POST", body={})
            assert response.code == 401
        response = await fetch(service, "/v1/mcp/anonymous?workspaceId=ws_1", method="POST", body={})
        assert response.code == 429
        assert response.headers["Retry-After"] == "1"
        other_path = await fetch(service, "/mcp/anonymous?workspaceId=ws_1", method="POST", body={})
        assert other_path.code == 401, "each route has its own bucket"


async def test_bootstrap_per_account_limit(data_dir: Path) -> None:
    clock = ManualClock(start=time.time())
    async with running(data_dir, clock=clock, mcp_rate_per_minute=1000) as service:
        first = await anonymous_key(service)
        headers = {"Authorization": f"Bearer {first['accessToken']}"}
        codes = []
        for _ in range(24):
            codes.append((await fetch(service, "/auth/anonymous/session", method="POST", body={}, headers=headers)).code)
        assert codes == [200] * 23 + [429], "24 per minute, one spent by the first bootstrap"
        clock.advance(2.5)
        assert (await fetch(service, "/auth/anonymous/session", method="POST", body={}, headers=headers)).code == 200


async def test_bootstrap_global_window(data_dir: Path) -> None:
    clock = ManualClock(start=1_000_040.0)
    async with running(
        data_dir, clock=clock, bootstrap_global_per_minute=3, mcp_rate_per_minute=1000, token_rate_per_minute=1000
    ) as service:
        for _ in range(3):
            await anonymous_key(service, user_agent="x")
        token = json_body(await post_token(service))["accessToken"]
        response = await fetch(
            service, "/auth/anonymous/session", method="POST", body={}, headers={"Authorization": f"Bearer {token}"}
        )
        assert response.code == 429
        assert response.headers["Retry-After"] == "40", "the window restarts at the next whole minute"


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        ("198.51.100.9", {"X-Forwarded-For": "1.1.1.1"}, "198.51.100.9"),
        ("10.0.0.5", {"X-Forwarded-For": "1.1.1.1, 10.0.0.9"}, "1.1.1.1"),
        ("10.0.0.5", {"X-Forwarded-For": "2.2.2.2, 1.1.1.1"}, "1.1.1.1"),
        ("10.0.0.5", {"X-Forwarded-For": "garbage"}, "10.0.0.5"),
        ("10.0.0.5", {"CF-Connecting-IP": "3.3.3.3", "X-Forwarded-For": "1.1.1.1"}, "3.3.3.3"),
        ("10.0.0.5", {"X-Real-IP": "4.4.4.4"}, "4.4.4.4"),
        ("10.0.0.5", {"X-Forwarded-For": "10.0.0.7, 10.0.0.8"}, "10.0.0.5"),
        ("::ffff:198.51.100.9", {}, "198.51.100.9"),
    ],
)
def test_client_ip_resolution(peer: str, headers: dict[str, str], expected: str) -> None:
    trusted = parse_networks(["10.0.0.0/8"])
    assert client_ip(peer, headers, trusted) == expected
    ipaddress.ip_address(client_ip(peer, headers, trusted))
