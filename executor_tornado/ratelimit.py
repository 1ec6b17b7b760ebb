"""Rate limiting: client identification and the buckets of every route.

Each limit is a token bucket (or, for the global bootstrap limit, a fixed
window) kept in the store. A bucket stores only its token count and the time
that count was computed; a check refills it by the elapsed time, takes a
token and writes both back in one atomic store operation. So there is no
periodic leak task, several processes sharing a store see one bucket, and
tests move an injected clock instead of sleeping.

Buckets are keyed by route, client IP and user agent. Because a client can
rotate its user agent, a second bucket per route and IP (the *ceiling*,
a multiple of the per-agent capacity) caps what one address can do.

Example::

    limiter = RateLimiter(store, settings, clock)
    decision = await limiter.check_route("/v1/mcp", client_ip, user_agent, per_minute=120)
    if not decision.allowed:
        respond_429(retry_after_header(decision))
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping

from executor_tornado.clock import Clock
from executor_tornado.settings import Settings
from store.base import Store
from store.records import BucketSpec, RateDecision

__all__ = ["RateLimiter", "client_ip", "retry_after_header"]

USER_AGENT_KEY_CHARS = 128
BOOTSTRAP_ID_KEY_CHARS = 120

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: list[str]) -> list[IPNetwork]:
    return [ipaddress.ip_network(cidr, strict=False) for cidr in cidrs]


def _parse_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    value = value.strip()
    if value.startswith("[") and "]" in value:
        value = value[1 : value.index("]")]
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address, networks: list[IPNetwork]) -> bool:
    return any(address in network for network in networks)


def client_ip(peer: str, headers: Mapping[str, str], trusted_proxies: list[IPNetwork]) -> str:
    """Return the client address of a request.

    The socket peer is the client unless it is a trusted proxy. Only then
    are forwarding headers read: ``CF-Connecting-IP``, else
    ``X-Forwarded-For`` walked from the right to the first untrusted hop,
    else ``X-Real-IP``. Malformed values are ignored.
    """
    peer_address = _parse_ip(peer)
    if peer_address is None:
        return peer
    if not trusted_proxies or not _trusted(peer_address, trusted_proxies):
        return str(peer_address)

    connecting = _parse_ip(headers.get("CF-Connecting-IP", ""))
    if connecting is not None:
        return str(connecting)

    forwarded = headers.get("X-Forwarded-For", "")
    if forwarded:
        hops = [_parse_ip(hop) for hop in forwarded.split(",")]
        for hop in reversed(hops):
            if hop is None:
                break
            if not _trusted(hop, trusted_proxies):
                return str(hop)

    real = _parse_ip(headers.get("X-Real-IP", ""))
    if real is not None:
        return str(real)
    return str(peer_address)


def retry_after_header(decision: RateDecision) -> str:
    """Return ``Retry-After`` in whole seconds, rounded up and at least 1."""
    return str(max(1, math.ceil(decision.retry_after)))


class RateLimiter:
    """The rate limits of every route, on buckets kept in the store."""

    def __init__(self, store: Store, settings: Settings, clock: Clock) -> None:
        self._store = store
        self._settings = settings
        self._clock = clock

    async def check_route(self, route: str, ip: str, user_agent: str, *, per_minute: int) -> RateDecision:
        """Take one token from the (route, IP, user agent) bucket and the per-IP ceiling.

        Both buckets are updated in one store operation. The per-agent bucket
        is checked first; its token is spent even when the ceiling then
        rejects, so rotating agents cannot probe for free.
        """
        if not self._settings.rate_limit_enabled:
            return RateDecision(allowed=True, remaining=float(per_minute), retry_after=0.0)
        agent = user_agent[:USER_AGENT_KEY_CHARS]
        ceiling = per_minute * self._settings.ip_ceiling_factor
        buckets = [
            BucketSpec(f"route|{route}|{ip}|{agent}", capacity=per_minute, refill_per_second=per_minute / 60.0),
            BucketSpec(f"ceiling|{route}|{ip}", capacity=ceiling, refill_per_second=ceiling / 60.0),
        ]
        decisions = await self._store.take_tokens(buckets, now=self._clock.time())
        if not decisions[-1].allowed:
            return decisions[-1]
        return decisions[0]

    async def check_bootstrap(self, client_kind: str, identifier: str) -> RateDecision:
        """Count one session bootstrap against the global window and the per-identity bucket."""
        if not self._settings.rate_limit_enabled:
            return RateDecision(allowed=True, remaining=0.0, retry_after=0.0)
        now = self._clock.time()

        global_decision = await self._store.hit_window(
            "bootstrap|global", limit=self._settings.bootstrap_global_per_minute, window_seconds=60.0, now=now
        )
        if not global_decision.allowed:
            return global_decision

        per_minute = self._settings.bootstrap_rate_per_minute
        key = f"bootstrap|{client_kind}|{identifier[:BOOTSTRAP_ID_KEY_CHARS]}"
        return await self._store.take_token(key, capacity=per_minute, refill_per_second=per_minute / 60.0, now=now)
