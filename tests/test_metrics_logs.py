"""``/metrics``, ``/healthz``, ``/readyz`` and the request log, over real HTTP.

The metrics are read back with ``prometheus_client.parser``, the parser
Prometheus' own Python client ships, and compared before and after known
traffic. Log lines are captured with the service's JSON formatter.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
from prometheus_client.parser import text_string_to_metric_families

from conftest import anonymous_key, fetch, running
from executor_tornado.logs import JsonFormatter, RequestIdFilter
from service_process import call_tool, mcp_headers, open_session
from sse_client import SseReader


async def scrape(service: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Return every sample of ``/metrics`` keyed by name and sorted labels."""
    response = await fetch(service, "/metrics")
    assert response.code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    samples = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str, **labels: str) -> float:
    """Sum the samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (sample_name, sample_labels), v in samples.items() if sample_name == name and wanted <= set(sample_labels))


async def test_metrics_move_with_traffic(data_dir: Path) -> None:
    async with running(data_dir, mcp_plugins=["transport_plugin:register"], token_rate_per_minute=2) as service:
        before = await scrape(service)

        for _ in range(3):
            assert (await fetch(service, "/healthz")).code == 200
        assert (await fetch(service, "/no/such/path")).code == 404
        bootstrap = await anonymous_key(service, user_agent="metrics-test")
        limited = await fetch(service, "/auth/anonymous/token", method="POST", headers={"User-Agent": "metrics-test"})
        assert limited.code == 200
        limited = await fetch(service, "/auth/anonymous/token", method="POST", headers={"User-Agent": "metrics-test"})
        assert limited.code == 429
        unauthorized = await fetch(
            service, f"/v1/mcp/anonymous?workspaceId={bootstrap['workspaceId']}", method="POST", body="{}",
            headers={"X-API-Key": "not-a-key"},
        )
        assert unauthorized.code == 401

        async with httpx2.AsyncClient(timeout=60) as client:
            url, key = bootstrap["mcpUrl"], bootstrap["apiKey"]
            session_id = await open_session(client, url, key)
            result = await call_tool(client, url, key, session_id, "execute", {"code": "20 + 22"})
            assert result["result"]["structuredContent"]["status"] == "completed", result
            assert result["result"]["structuredContent"]["result"] == 42

            stream_headers = {**mcp_headers(key, session_id), "Accept": "text/event-stream"}
            async with client.stream("GET", url, headers=stream_headers) as stream:
                assert stream.status_code == 200
                # Keep the reader: dropping it closes the response, and so the stream.
                reader = SseReader(stream)
                await reader.next_event()
                during = await scrape(service)
            after = await scrape(service)

        health = ("executor_http_requests_total", {"route": "/healthz", "status": "200"})
        assert value(after, health[0], **health[1]) - value(before, health[0], **health[1]) == 3
        assert value(after, "executor_http_requests_total", route="unmatched", status="404") == 1
        assert value(after, "executor_http_request_duration_seconds_count", route="/healthz") == 3
        assert value(after, "executor_http_requests_total", route="/auth/anonymous/token", status="429") == 1
        assert value(after, "executor_rate_limit_rejections_total", route="/auth/anonymous/token") == 1
        assert value(after, "executor_auth_failures_total", route="/v1/mcp/anonymous") == 1
        assert value(after, "executor_tasks_total", status="completed") == 1
        assert value(during, "executor_mcp_live_sessions") == 1
        assert value(during, "executor_sse_open_streams") == 1
        assert value(during, "executor_http_requests_in_progress") == 2, "the GET stream and the scrape itself"
        rate_operations = sum(
            total(after, "executor_store_operation_duration_seconds_count", operation=name)
            for name in ("take_token", "take_tokens")
        )
        assert rate_operations >= 3, "one rate-limit store operation per limited request"
        assert total(after, "executor_store_operation_duration_seconds_count") > total(
            before, "executor_store_operation_duration_seconds_count"
        )
        assert value(after, "executor_store_errors_total", operation="take_token") == 0


async def test_health_and_readiness(data_dir: Path) -> None:
    async with running(data_dir) as service:
        health = await fetch(service, "/healthz")
        assert health.code == 200
        assert json.loads(health.body) == {"status": "ok"}
        ready = await fetch(service, "/readyz")
        assert ready.code == 200
        assert json.loads(ready.body) == {"status": "ready"}

        service.draining = True
        draining = await fetch(service, "/readyz")
        service.draining = False
        assert draining.code == 503
        assert json.loads(draining.body) == {"error": "Shutting down: send new requests to another process"}

        await service.store.close()
        unreachable = await fetch(service, "/readyz")
        assert unreachable.code == 503
        assert json.loads(unreachable.body)["error"].startswith("Store is not reachable")
        await service.store.open()


@contextlib.contextmanager
def captured_json_logs() -> Iterator[list[dict[str, Any]]]:
    """Collect every log line as the JSON object the service would write."""
    lines: list[dict[str, Any]] = []
    formatter = JsonFormatter()

    class Collector(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(json.loads(formatter.format(record)))

    handler = Collector()
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    previous_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(previous_level)


async def test_request_id_on_every_line(data_dir: Path) -> None:
    async with running(data_dir) as service:
        bootstrap = await anonymous_key(service)
        with captured_json_logs() as lines:
            response = await fetch(
                service,
                f"/v1/mcp/anonymous?workspaceId={bootstrap['workspaceId']}",
                method="POST",
                body="{}",
                headers={"X-API-Key": bootstrap["apiKey"] + "x", "X-Request-Id": "client-chosen-id-1"},
            )
            assert response.code == 401
            assert response.headers["X-Request-Id"] == "client-chosen-id-1"

            replaced = await fetch(service, "/healthz", headers={"X-Request-Id": "bad id\twith spaces"})
            generated = replaced.headers["X-Request-Id"]
            assert generated != "bad id\twith spaces"
            assert len(generated) == 16

        request_lines = [line for line in lines if line.get("request_id") == "client-chosen-id-1"]
        loggers = {line["logger"] for line in request_lines}
        assert "executor_tornado" in loggers, "the rejected credential line carries the request id"
        assert "executor_tornado.access" in loggers
        (access,) = [line for line in request_lines if line["logger"] == "executor_tornado.access"]
        assert access["route"] == "/v1/mcp/anonymous"
        assert access["status"] == 401
        assert access["method"] == "POST"
        assert isinstance(access["duration_ms"], float)
        (health_access,) = [line for line in lines if line.get("request_id") == generated]
        assert health_access["route"] == "/healthz"

        text = json.dumps(lines)
        assert bootstrap["apiKey"] not in text, "no API key in any log line"
        assert bootstrap["apiKey"][:40] not in text
        assert bootstrap["accessToken"] not in text


async def test_text_format_shows_request_id(tmp_path: Path) -> None:
    from executor_tornado.logs import TEXT_FORMAT, request_id_var

    record = logging.LogRecord("executor_tornado", logging.INFO, __file__, 1, "Loaded %d keys", (3,), None)
    token = request_id_var.set("abcdef0123456789")
    try:
        RequestIdFilter().filter(record)
    finally:
        request_id_var.reset(token)
    line = logging.Formatter(TEXT_FORMAT).format(record)
    assert line.endswith("INFO    executor_tornado [abcdef0123456789]: Loaded 3 keys")
