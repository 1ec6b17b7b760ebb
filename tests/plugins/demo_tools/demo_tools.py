"""Demo tools that the executor-tornado tests load through the ``executor_tornado.tools`` entry point.

The module does not import executor-tornado: each tool is a mapping with
the keys of ``executor_tornado.tools.ToolSpec``. ``CALLS`` records every call
that reached a handler, so a test can check that a tool ran or never ran.
"""

from __future__ import annotations

from typing import Any

CALLS: list[tuple[str, dict[str, Any]]] = []


class DemoFailure(Exception):
    """An error type the service does not know, raised by ``demo.fail``."""


async def echo(arguments: dict[str, Any], context: Any) -> dict[str, Any]:
    CALLS.append(("demo.echo", dict(arguments)))
    return {
        "text": arguments["text"] * arguments.get("repeat", 1),
        "workspace": context.workspace_id,
    }


async def send(arguments: dict[str, Any], context: Any) -> dict[str, Any]:
    CALLS.append(("demo.send", dict(arguments)))
    return {"sent": True, "to": arguments["to"]}


async def fail(arguments: dict[str, Any], context: Any) -> None:
    CALLS.append(("demo.fail", dict(arguments)))
    raise DemoFailure("connection string postgres://user:pw@db/prod is unreachable")


def tools() -> list[dict[str, Any]]:
    """Return the demo tools; the entry point ``demo = demo_tools:tools`` names this function."""
    return [
        {
            "path": "demo.echo",
            "description": "Echo a text back, repeated a number of times.",
            "handler": echo,
            "input_schema": {
                "type": "object",
                "properties": {
                    "text": {"type": "string"},
                    "repeat": {"type": "integer", "minimum": 1, "maximum": 10},
                },
                "required": ["text"],
                "additionalProperties": False,
            },
        },
        {
            "path": "demo.send",
            "description": "Send a message to a recipient with an API key; needs a person's approval.",
            "handler": send,
            "approval": "required",
            "input_schema": {
                "type": "object",
                "properties": {
                    "to": {"type": "string"},
                    "message": {"type": "string"},
                    "api_key": {"type": "string"},
                },
                "required": ["to", "message"],
                "additionalProperties": False,
            },
        },
        {
            "path": "demo.fail",
            "description": "Always fail with an error type the service does not know.",
            "handler": fail,
        },
    ]
