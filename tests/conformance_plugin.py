"""The reference tools, resources and prompts of the MCP conformance suite, as an MCP plug-in.

``@modelcontextprotocol/conformance`` 0.1.16 in server mode calls fixed names
(``test_simple_text``, ``test://static-text``, ``test_simple_prompt`` and so
on) and checks the shape of each result. ``register(registry)`` adds all of
them, plus ``logging/setLevel``, resource subscriptions and prompt-argument
completion. tests/test_conformance.py loads it with
``mcp_plugins=["conformance_plugin:register"]``.

Tools that talk back to the client (logging, progress, sampling, elicitation)
pass ``related_request_id=ctx.request_id`` so their messages ride the SSE
stream of the ``tools/call`` POST, not the standalone GET stream.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import struct
import wave
import zlib
from typing import Any

import mcp_types as types
from mcp.server.context import ServerRequestContext

from executor_tornado.mcp.registry import McpRegistry

__all__ = ["register"]

# Order of RFC 5424 severities used by MCP logging, lowest first.
LOG_LEVELS = ("debug", "info", "notice", "warning", "error", "critical", "alert", "emergency")
DEFAULT_LOG_LEVEL = "info"

STEP_DELAY_SECONDS = 0.05
JSON_SCHEMA_2020_12 = "https://json-schema.org/draft/2020-12/schema"
TEMPLATE_URI = re.compile(r"^test://template/(?P<id>[^/]+)/data$")
COMPLETION_CANDIDATES = ("paris", "park", "party", "test", "testing", "tested")

NO_ARGUMENTS: dict[str, Any] = {"type": "object", "properties": {}}


def _png_1x1_red() -> bytes:
    """Build a valid 1x1 RGB PNG with one red pixel."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def _wav_silence() -> bytes:
    """Build a valid WAV file: 10 ms of 8 kHz mono 8-bit silence."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(1)
        wav.setframerate(8000)
        wav.writeframes(b"\x80" * 80)
    return buffer.getvalue()


PNG_BASE64 = base64.b64encode(_png_1x1_red()).decode()
WAV_BASE64 = base64.b64encode(_wav_silence()).decode()


def _text(text: str) -> types.TextContent:
    return types.TextContent(type="text", text=text)


def _image() -> types.ImageContent:
    return types.ImageContent(type="image", data=PNG_BASE64, mime_type="image/png")


def _result(*content: Any, is_error: bool = False) -> types.CallToolResult:
    return types.CallToolResult(content=list(content), is_error=is_error)


def _session_key(ctx: ServerRequestContext[Any, Any]) -> str | None:
    """Return the MCP session id of the request (``None`` for a stateless 2026-07-28 request)."""
    caller = ctx.request
    return getattr(caller, "session_id", None)


class ConformanceState:
    """Per-session log levels and resource subscriptions of one plug-in instance.

    NOTE: entries are never removed when a session closes. That is fine for a
    test service that lives for one suite run, not for a long-lived one.
    """

    def __init__(self) -> None:
        self.log_levels: dict[str, str] = {}
        self.subscriptions: dict[str, set[str]] = {}

    def log_enabled(self, ctx: ServerRequestContext[Any, Any], level: str) -> bool:
        """Return whether ``level`` is at or above the level the request's session set with ``logging/setLevel``."""
        threshold = DEFAULT_LOG_LEVEL
        key = _session_key(ctx)
        if key is not None:
            threshold = self.log_levels.get(key, DEFAULT_LOG_LEVEL)
        return LOG_LEVELS.index(level) >= LOG_LEVELS.index(threshold)


def register(registry: McpRegistry) -> None:
    """Add the conformance suite's reference tools, resources, prompts and handlers to ``registry``."""
    state = ConformanceState()
    _register_content_tools(registry)
    _register_interactive_tools(registry, state)
    _register_elicitation_tools(registry)
    _register_resources(registry, state)
    _register_prompts(registry)


# -- tools that only return content ------------------------------------------------------


def _register_content_tools(registry: McpRegistry) -> None:
    async def simple_text(ctx: Any, arguments: dict[str, Any]) -> types.CallToolResult:
        return _result(_text("This is a simple text response for testing."))

    async def image_content(ctx: Any, arguments: dict[str, Any]) -> types.CallToolResult:
        return _result(_image())

    async def audio_content(ctx: Any, arguments: dict[str, Any]) -> types.CallToolResult:
        return _result(types.AudioContent(type="audio", data=WAV_BASE64, mime_type="audio/wav"))

    async def embedded_resource(ctx: Any, arguments: dict[str, Any]) -> types.CallToolResult:
        resource = types.TextResourceContents(
            uri="test://embedded-resource", mime_type="text/plain", text="This is an embedded resource content."
        )
        return _result(types.EmbeddedResource(type="resource", resource=resource))

    async def multiple_content_types(ctx: Any, arguments: dict[str, Any]) -> types.CallToolResult:
        resource = types.TextResourceContents(
            uri="test://mixed-content-resource",
            mime_type="application/json",
            text=json.dumps({"test": "data", "value": 123}),
        )
        return _result(
            _text("Multiple content types test:"),
            _image(),
            types.EmbeddedResource(type="resource", resource=resource),
        )

    async def error_handling(ctx: Any, arguments: dict[str, Any]) -> types.CallToolResult:
        return _result(_text("This tool intentionally returns an error for testing"), is_error=True)

    async def json_schema_tool(ctx: Any, arguments: dict[str, Any]) -> types.CallToolResult:
        return _result(_text(f"Received: {json.dumps(arguments, sort_keys=True)}"))

    json_schema_2020_12 = {
        "$schema": JSON_SCHEMA_2020_12,
        "type": "object",
        "$defs": {
            "address": {
                "type": "object",
                "properties": {"street": {"type": "string"}, "city": {"type": "string"}},
            }
        },
        "properties": {"name": {"type": "string"}, "address": {"$ref": "#/$defs/address"}},
        "additionalProperties": False,
    }
    tools = [
        ("test_simple_text", "Return a simple text content item.", NO_ARGUMENTS, simple_text),
        ("test_image_content", "Return a 1x1 PNG image content item.", NO_ARGUMENTS, image_content),
        ("test_audio_content", "Return a short WAV audio content item.", NO_ARGUMENTS, audio_content),
        ("test_embedded_resource", "Return an embedded text resource.", NO_ARGUMENTS, embedded_resource),
        (
            "test_multiple_content_types",
            "Return text, image and embedded resource content items.",
            NO_ARGUMENTS,
            multiple_content_types,
        ),
        (
            "test_error_handling",
            "Return a tool result with isError set, never a JSON-RPC error.",
            NO_ARGUMENTS,
            error_handling,
        ),
        (
            "json_schema_2020_12_tool",
            "Accept arguments described by a JSON Schema 2020-12 input schema.",
            json_schema_2020_12,
            json_schema_tool,
        ),
    ]
    for name, description, schema, handler in tools:
        registry.add_tool(types.Tool(name=name, description=description, input_schema=schema), handler)


# -- tools that send notifications or requests back to the client ---------------------------


def _register_interactive_tools(registry: McpRegistry, state: ConformanceState) -> None:
    async def tool_with_logging(ctx: ServerRequestContext[Any, Any], arguments: dict[str, Any]) -> types.CallToolResult:
        messages = ("Tool execution started", "Tool processing data", "Tool execution completed")
        for index, message in enumerate(messages):
            if index:
                await asyncio.sleep(STEP_DELAY_SECONDS)
            if state.log_enabled(ctx, "info"):
                await ctx.session.send_log_message(
                    "info", message, logger="conformance", related_request_id=ctx.request_id
                )
        return _result(_text("Tool with logging executed successfully"))

    async def tool_with_progress(ctx: ServerRequestContext[Any, Any], arguments: dict[str, Any]) -> types.CallToolResult:
        for index, progress in enumerate((0.0, 50.0, 100.0)):
            if index:
                await asyncio.sleep(STEP_DELAY_SECONDS)
            await ctx.session.report_progress(progress, 100.0, f"Completed step {index + 1} of 3")
        return _result(_text("Tool with progress executed successfully"))

    async def sampling(ctx: ServerRequestContext[Any, Any], arguments: dict[str, Any]) -> types.CallToolResult:
        required = types.ClientCapabilities(sampling=types.SamplingCapability())
        if not ctx.session.check_client_capability(required):
            return _result(_text("The client did not declare the sampling capability"), is_error=True)
        message = types.SamplingMessage(role="user", content=_text(str(arguments.get("prompt", ""))))
        reply = await ctx.session.create_message(
            messages=[message], max_tokens=100, related_request_id=ctx.request_id
        )
        content = reply.content
        if isinstance(content, types.TextContent):
            reply_text = content.text
        else:
            reply_text = json.dumps(content.model_dump(mode="json", by_alias=True, exclude_none=True))
        return _result(_text(f"LLM response: {reply_text}"))

    async def reconnection(ctx: ServerRequestContext[Any, Any], arguments: dict[str, Any]) -> types.CallToolResult:
        # The transport attaches an SSE stream to a POST only after its JSON
        # window (50 ms by default). Wait past it, so there is a stream to close.
        await asyncio.sleep(0.2)
        if ctx.close_sse_stream is not None:
            await ctx.close_sse_stream()
        await asyncio.sleep(0.1)
        return _result(_text("Reconnection test completed successfully"))

    tools = [
        (
            "test_tool_with_logging",
            "Send three info log notifications about 50 ms apart, then return.",
            NO_ARGUMENTS,
            tool_with_logging,
        ),
        (
            "test_tool_with_progress",
            "Report progress 0, 50 and 100 of 100 for the request's progress token, then return.",
            NO_ARGUMENTS,
            tool_with_progress,
        ),
        (
            "test_sampling",
            "Ask the client for an LLM completion of the prompt with sampling/createMessage.",
            {
                "type": "object",
                "properties": {"prompt": {"type": "string", "description": "The prompt to send to the LLM"}},
                "required": ["prompt"],
            },
            sampling,
        ),
        (
            "test_reconnection",
            "Close this call's SSE stream before the result, so the client resumes with GET and Last-Event-ID.",
            NO_ARGUMENTS,
            reconnection,
        ),
    ]
    for name, description, schema, handler in tools:
        registry.add_tool(types.Tool(name=name, description=description, input_schema=schema), handler)

    async def set_level(ctx: ServerRequestContext[Any, Any], params: types.SetLevelRequestParams) -> types.EmptyResult:
        key = _session_key(ctx)
        if key is not None:
            state.log_levels[key] = params.level
        return types.EmptyResult()

    registry.add_request_handler("logging/setLevel", types.SetLevelRequestParams, set_level)


# -- elicitation --------------------------------------------------------------------------


async def _elicit(
    ctx: ServerRequestContext[Any, Any], message: str, schema: dict[str, Any]
) -> types.CallToolResult:
    required = types.ClientCapabilities(elicitation=types.ElicitationCapability())
    if not ctx.session.check_client_capability(required):
        return _result(_text("The client did not declare the elicitation capability"), is_error=True)
    reply = await ctx.session.elicit_form(message, schema, related_request_id=ctx.request_id)
    content = json.dumps(reply.content, sort_keys=True) if reply.content is not None else "null"
    return _result(_text(f"Elicitation completed: action={reply.action}, content={content}"))


ELICITATION_SCHEMA = {
    "type": "object",
    "properties": {
        "username": {"type": "string", "description": "User's response"},
        "email": {"type": "string", "description": "User's email address"},
    },
    "required": ["username", "email"],
}

SEP1034_DEFAULTS_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "description": "User name", "default": "John Doe"},
        "age": {"type": "integer", "description": "User age", "default": 30},
        "score": {"type": "number", "description": "User score", "default": 95.5},
        "status": {
            "type": "string",
            "description": "User status",
            "enum": ["active", "inactive", "pending"],
            "default": "active",
        },
        "verified": {"type": "boolean", "description": "Verification status", "default": True},
    },
    "required": [],
}

SEP1330_ENUMS_SCHEMA = {
    "type": "object",
    "properties": {
        "untitledSingle": {"type": "string", "enum": ["option1", "option2", "option3"]},
        "titledSingle": {
            "type": "string",
            "oneOf": [
                {"const": "value1", "title": "First Option"},
                {"const": "value2", "title": "Second Option"},
                {"const": "value3", "title": "Third Option"},
            ],
        },
        "legacyEnum": {
            "type": "string",
            "enum": ["opt1", "opt2", "opt3"],
            "enumNames": ["Option One", "Option Two", "Option Three"],
        },
        "untitledMulti": {
            "type": "array",
            "items": {"type": "string", "enum": ["option1", "option2", "option3"]},
        },
        "titledMulti": {
            "type": "array",
            "items": {
                "anyOf": [
                    {"const": "value1", "title": "First Choice"},
                    {"const": "value2", "title": "Second Choice"},
                    {"const": "value3", "title": "Third Choice"},
                ]
            },
        },
    },
    "required": [],
}


def _register_elicitation_tools(registry: McpRegistry) -> None:
    async def elicitation(ctx: ServerRequestContext[Any, Any], arguments: dict[str, Any]) -> types.CallToolResult:
        return await _elicit(ctx, str(arguments.get("message", "")), ELICITATION_SCHEMA)

    async def sep1034_defaults(ctx: ServerRequestContext[Any, Any], arguments: dict[str, Any]) -> types.CallToolResult:
        return await _elicit(ctx, "Please review the fields. Each has a default value.", SEP1034_DEFAULTS_SCHEMA)

    async def sep1330_enums(ctx: ServerRequestContext[Any, Any], arguments: dict[str, Any]) -> types.CallToolResult:
        return await _elicit(ctx, "Please pick from each list", SEP1330_ENUMS_SCHEMA)

    tools = [
        (
            "test_elicitation",
            "Ask the user for a username and an email address with elicitation/create.",
            {
                "type": "object",
                "properties": {"message": {"type": "string", "description": "The message to show the user"}},
                "required": ["message"],
            },
            elicitation,
        ),
        (
            "test_elicitation_sep1034_defaults",
            "Elicit string, integer, number, enum and boolean fields that all have default values.",
            NO_ARGUMENTS,
            sep1034_defaults,
        ),
        (
            "test_elicitation_sep1330_enums",
            "Elicit untitled and titled single- and multi-select enums and a legacy enumNames field.",
            NO_ARGUMENTS,
            sep1330_enums,
        ),
    ]
    for name, description, schema, handler in tools:
        registry.add_tool(types.Tool(name=name, description=description, input_schema=schema), handler)


# -- resources ----------------------------------------------------------------------------


def _register_resources(registry: McpRegistry, state: ConformanceState) -> None:
    async def read_static_text(ctx: Any, uri: str) -> types.ReadResourceResult:
        contents = types.TextResourceContents(
            uri=uri, mime_type="text/plain", text="This is the content of the static text resource."
        )
        return types.ReadResourceResult(contents=[contents])

    async def read_static_binary(ctx: Any, uri: str) -> types.ReadResourceResult:
        return types.ReadResourceResult(
            contents=[types.BlobResourceContents(uri=uri, mime_type="image/png", blob=PNG_BASE64)]
        )

    async def read_watched(ctx: Any, uri: str) -> types.ReadResourceResult:
        contents = types.TextResourceContents(uri=uri, mime_type="text/plain", text="Watched resource content.")
        return types.ReadResourceResult(contents=[contents])

    async def read_template(ctx: Any, uri: str) -> types.ReadResourceResult:
        match = TEMPLATE_URI.match(uri)
        assert match is not None, "the registry calls this reader only for matching URIs"
        item_id = match.group("id")
        text = json.dumps({"id": item_id, "templateTest": True, "data": f"Data for ID: {item_id}"})
        return types.ReadResourceResult(
            contents=[types.TextResourceContents(uri=uri, mime_type="application/json", text=text)]
        )

    resources = [
        ("test://static-text", "static-text", "A static text resource.", "text/plain", read_static_text),
        ("test://static-binary", "static-binary", "A static binary resource: a 1x1 PNG.", "image/png", read_static_binary),
        (
            "test://watched-resource",
            "watched-resource",
            "A resource that clients can subscribe to.",
            "text/plain",
            read_watched,
        ),
    ]
    for uri, name, description, mime_type, reader in resources:
        registry.add_resource(
            types.Resource(uri=uri, name=name, description=description, mime_type=mime_type), reader
        )
    registry.add_resource_template(
        types.ResourceTemplate(
            uri_template="test://template/{id}/data",
            name="template-data",
            description="JSON data for the id in the URI.",
            mime_type="application/json",
        ),
        lambda uri: TEMPLATE_URI.match(uri) is not None,
        read_template,
    )

    async def subscribe(ctx: ServerRequestContext[Any, Any], params: types.SubscribeRequestParams) -> types.EmptyResult:
        key = _session_key(ctx)
        if key is not None:
            state.subscriptions.setdefault(key, set()).add(str(params.uri))
        return types.EmptyResult()

    async def unsubscribe(
        ctx: ServerRequestContext[Any, Any], params: types.UnsubscribeRequestParams
    ) -> types.EmptyResult:
        key = _session_key(ctx)
        if key is not None:
            state.subscriptions.get(key, set()).discard(str(params.uri))
        return types.EmptyResult()

    registry.add_request_handler("resources/subscribe", types.SubscribeRequestParams, subscribe)
    registry.add_request_handler("resources/unsubscribe", types.UnsubscribeRequestParams, unsubscribe)


# -- prompts and completion ------------------------------------------------------------------


def _user(content: Any) -> types.PromptMessage:
    return types.PromptMessage(role="user", content=content)


def _register_prompts(registry: McpRegistry) -> None:
    async def simple_prompt(ctx: Any, arguments: dict[str, str]) -> types.GetPromptResult:
        return types.GetPromptResult(messages=[_user(_text("This is a simple prompt for testing."))])

    async def prompt_with_arguments(ctx: Any, arguments: dict[str, str]) -> types.GetPromptResult:
        text = f"Prompt with arguments: arg1='{arguments.get('arg1', '')}', arg2='{arguments.get('arg2', '')}'"
        return types.GetPromptResult(messages=[_user(_text(text))])

    async def prompt_with_embedded_resource(ctx: Any, arguments: dict[str, str]) -> types.GetPromptResult:
        resource = types.TextResourceContents(
            uri=arguments.get("resourceUri", "test://example-resource"),
            mime_type="text/plain",
            text="Embedded resource content for testing.",
        )
        return types.GetPromptResult(
            messages=[
                _user(types.EmbeddedResource(type="resource", resource=resource)),
                _user(_text("Please process the embedded resource above.")),
            ]
        )

    async def prompt_with_image(ctx: Any, arguments: dict[str, str]) -> types.GetPromptResult:
        return types.GetPromptResult(messages=[_user(_image()), _user(_text("Please analyze the image above."))])

    def argument(name: str, description: str) -> types.PromptArgument:
        return types.PromptArgument(name=name, description=description, required=True)

    prompts = [
        ("test_simple_prompt", "A prompt without arguments.", None, simple_prompt),
        (
            "test_prompt_with_arguments",
            "A prompt that repeats its two arguments.",
            [argument("arg1", "First test argument"), argument("arg2", "Second test argument")],
            prompt_with_arguments,
        ),
        (
            "test_prompt_with_embedded_resource",
            "A prompt that embeds the resource named by resourceUri.",
            [argument("resourceUri", "URI of the resource to embed")],
            prompt_with_embedded_resource,
        ),
        ("test_prompt_with_image", "A prompt with an image.", None, prompt_with_image),
    ]
    for name, description, arguments, handler in prompts:
        registry.add_prompt(types.Prompt(name=name, description=description, arguments=arguments), handler)

    async def complete(ctx: Any, params: types.CompleteRequestParams) -> types.CompleteResult:
        values: list[str] = []
        if isinstance(params.ref, types.PromptReference) and params.ref.name == "test_prompt_with_arguments":
            prefix = params.argument.value
            values = [value for value in COMPLETION_CANDIDATES if value.startswith(prefix)]
        return types.CompleteResult(completion=types.Completion(values=values, total=len(values), has_more=False))

    registry.set_completion(complete)
