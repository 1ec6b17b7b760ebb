"""Session hijack: a session id works only for the principal and workspace that created it.

Another principal, the same principal on another workspace, and anyone
after DELETE get 404, and the failed attempt leaves the session as it was.
Session ids carry at least 128 bits from the OS random source.
"""

from __future__ import annotations

import base64
import random
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import MCP_HEADERS, anonymous_key, fetch, initialize_body, json_body, running
from store.records import Workspace
from test_mcp_oauth import MEMBER, WORKSPACE, oauth_service, url

INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}
PING = {"jsonrpc": "2.0", "id": 7, "method": "ping"}


async def _open(target: str, headers: dict[str, str]) -> str:
    response = await fetch(target, method="POST", body=initialize_body(), headers={**MCP_HEADERS, **headers})
    assert response.code == 200, response.body
    session_id = response.headers["Mcp-Session-Id"]
    acknowledged = await fetch(
        target, method="POST", body=INITIALIZED, headers={**MCP_HEADERS, **headers, "Mcp-Session-Id": session_id}
    )
    assert acknowledged.code == 202
    return session_id


async def _every_verb(target: str, headers: dict[str, str], session_id: str) -> dict[str, Any]:
    """Send POST request, POST notification, GET and DELETE with ``session_id`` and return the responses."""
    with_session = {**MCP_HEADERS, **headers, "Mcp-Session-Id": session_id}
    return {
        "POST request": await fetch(target, method="POST", body=PING, headers=with_session),
        "POST notification": await fetch(target, method="POST", body=INITIALIZED, headers=with_session),
        "GET": await fetch(
            target, method="GET", headers={**with_session, "Accept": "text/event-stream"}, timeout=5
        ),
        "DELETE": await fetch(target, method="DELETE", headers=with_session),
    }


def _assert_all_not_found(responses: dict[str, Any], case: str) -> None:
    for verb, response in responses.items():
        assert response.code == 404, (case, verb, response.code)
        assert json_body(response)["error"]["code"] == -32001, (case, verb)


async def test_api_key_session_of_another_principal(data_dir: Path) -> None:
    async with running(data_dir) as service:
        owner = await anonymous_key(service, user_agent="owner")
        intruder = await anonymous_key(service, user_agent="intruder")
        owner_headers = {"X-API-Key": owner["apiKey"]}
        session_id = await _open(owner["mcpUrl"], owner_headers)

        attempts = await _every_verb(intruder["mcpUrl"], {"X-API-Key": intruder["apiKey"]}, session_id)
        _assert_all_not_found(attempts, "another principal")

        record = await service.store.get_mcp_session(session_id)
        assert record is not None
        assert record.state == "active", "the intruder's DELETE did not close the owner's session"
        still_mine = await fetch(
            owner["mcpUrl"], method="POST", body=PING,
            headers={**MCP_HEADERS, **owner_headers, "Mcp-Session-Id": session_id},
        )
        assert still_mine.code == 200

        deleted = await fetch(
            owner["mcpUrl"], method="DELETE", headers={**MCP_HEADERS, **owner_headers, "Mcp-Session-Id": session_id}
        )
        assert deleted.code in (200, 204)
        after_delete = await _every_verb(owner["mcpUrl"], owner_headers, session_id)
        _assert_all_not_found(after_delete, "after DELETE")
        reinitialize = await fetch(
            owner["mcpUrl"], method="POST", body=initialize_body(),
            headers={**MCP_HEADERS, **owner_headers, "Mcp-Session-Id": session_id},
        )
        assert reinitialize.code == 404, "a stale session id never reaches the new-session path"


async def test_oauth_session_on_another_workspace(data_dir: Path) -> None:
    async with oauth_service(data_dir) as (service, auth):
        await service.store.put_workspace(
            Workspace(id="ws_second", name="Second", created_at=time.time(), organization_id="org_1")
        )
        member = {"Authorization": f"Bearer {auth.token(MEMBER)}"}
        session_id = await _open(url(service), member)

        other_workspace = await _every_verb(url(service, workspace="ws_second"), member, session_id)
        _assert_all_not_found(other_workspace, "same subject, another workspace")

        anonymous = await anonymous_key(service)
        api_key_path = await _every_verb(
            f"{service.base_url}/v1/mcp/anonymous?workspaceId={anonymous['workspaceId']}",
            {"X-API-Key": anonymous["apiKey"]},
            session_id,
        )
        _assert_all_not_found(api_key_path, "API key principal with an OAuth session id")

        legacy_path = await fetch(
            url(service, "/mcp"), method="POST", body=PING, headers={**MCP_HEADERS, **member, "Mcp-Session-Id": session_id}
        )
        assert legacy_path.code == 200, "the legacy path is the same resource for the same principal"
        record = await service.store.get_mcp_session(session_id)
        assert record is not None and record.state == "active"


@pytest.mark.parametrize("guess", ["", "x", "0" * 43, "../../etc/passwd", "A" * 201, "%00", "\u00e9t\u00e9"])
async def test_guessed_session_ids_are_404(data_dir: Path, guess: str) -> None:
    async with running(data_dir) as service:
        owner = await anonymous_key(service)
        await _open(owner["mcpUrl"], {"X-API-Key": owner["apiKey"]})
        headers = {**MCP_HEADERS, "X-API-Key": owner["apiKey"], "Mcp-Session-Id": guess.encode().decode("latin-1")}
        response = await fetch(owner["mcpUrl"], method="POST", body=PING, headers=headers)
        if guess == "":
            assert response.code in (400, 404), "an empty id is no id or an unknown id"
        else:
            assert response.code == 404, guess
        assert response.code < 500


async def test_session_ids_come_from_os_random(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[bytes] = []
    real_urandom = random._urandom  # type: ignore[attr-defined]

    def recording_urandom(size: int) -> bytes:
        data = real_urandom(size)
        drawn.append(data)
        return data

    async with running(data_dir) as service:
        owner = await anonymous_key(service)
        monkeypatch.setattr(random, "_urandom", recording_urandom)
        ids = []
        for _ in range(40):
            response = await fetch(
                owner["mcpUrl"], method="POST", body=initialize_body(), headers={**MCP_HEADERS, "X-API-Key": owner["apiKey"]}
            )
            assert response.code == 200
            ids.append(response.headers["Mcp-Session-Id"])
            deleted = await fetch(
                owner["mcpUrl"], method="DELETE",
                headers={**MCP_HEADERS, "X-API-Key": owner["apiKey"], "Mcp-Session-Id": ids[-1]},
            )
            assert deleted.code in (200, 204)
        monkeypatch.undo()

    assert len(set(ids)) == len(ids)
    from_os = {base64.urlsafe_b64encode(data).rstrip(b"=").decode() for data in drawn if len(data) >= 16}
    for session_id in ids:
        decoded = base64.urlsafe_b64decode(session_id + "=" * (-len(session_id) % 4))
        assert len(decoded) * 8 >= 128, session_id
        assert session_id in from_os, "the session id is not bytes read from os.urandom"
