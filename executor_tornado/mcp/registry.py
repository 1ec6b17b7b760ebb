"""The plug-in point for MCP-level tools, resources and prompts.

The service builds one ``mcp`` SDK low-level :class:`~mcp.server.lowlevel.Server`
from a :class:`McpRegistry`. The core registers the ``execute`` tool;
plug-ins add more. A plug-in is a callable ``register(registry)`` found either
through the Python entry-point group ``executor_tornado.mcp`` (installed
distributions, always loaded) or named as ``module:function`` in
``EXECUTOR_MCP_PLUGINS`` (for example a test plug-in on ``PYTHONPATH``).

Example plug-in::

    import mcp_types as types

    def register(registry):
        async def echo(ctx, arguments):
            return types.CallToolResult(content=[types.TextContent(type="text", text=arguments["text"])])

        registry.add_tool(
            types.Tool(name="echo", description="Echo text", input_schema={"type": "object"}),
            echo,
        )
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.shared.exceptions import MCPError
from mcp_types import INVALID_PARAMS

__all__ = ["ENTRY_POINT_GROUP", "McpRegistry", "load_plugins"]

log = logging.getLogger("executor_tornado.mcp")

ENTRY_POINT_GROUP = "executor_tornado.mcp"

ToolHandler = Callable[[ServerRequestContext[Any, Any], dict[str, Any]], Awaitable[Any]]
ResourceReader = Callable[[ServerRequestContext[Any, Any], str], Awaitable[types.ReadResourceResult]]
PromptHandler = Callable[[ServerRequestContext[Any, Any], dict[str, str]], Awaitable[types.GetPromptResult]]


@dataclass
class _Template:
    template: types.ResourceTemplate
    matches: Callable[[str], bool]
    reader: ResourceReader


class McpRegistry:
    """Tools, resources, prompts and extra request handlers of the MCP server."""

    def __init__(self) -> None:
        self._tools: dict[str, tuple[types.Tool, ToolHandler]] = {}
        self._resources: dict[str, tuple[types.Resource, ResourceReader]] = {}
        self._templates: list[_Template] = []
        self._prompts: dict[str, tuple[types.Prompt, PromptHandler]] = {}
        self._completion: Callable[..., Awaitable[types.CompleteResult]] | None = None
        self._extra: list[tuple[str, type, Callable[..., Awaitable[Any]]]] = []
        self._extra_notifications: list[tuple[str, type, Callable[..., Awaitable[None]]]] = []

    # -- registration -----------------------------------------------------------------

    def add_tool(self, tool: types.Tool, handler: ToolHandler) -> None:
        """Register ``tool``; ``handler(ctx, arguments)`` returns a ``CallToolResult`` (or an input-required result)."""
        if tool.name in self._tools:
            raise ValueError(f"MCP tool {tool.name!r} is registered twice")
        self._tools[tool.name] = (tool, handler)

    def add_resource(self, resource: types.Resource, reader: ResourceReader) -> None:
        self._resources[str(resource.uri)] = (resource, reader)

    def add_resource_template(
        self, template: types.ResourceTemplate, matches: Callable[[str], bool], reader: ResourceReader
    ) -> None:
        self._templates.append(_Template(template, matches, reader))

    def add_prompt(self, prompt: types.Prompt, handler: PromptHandler) -> None:
        self._prompts[prompt.name] = (prompt, handler)

    def set_completion(self, handler: Callable[..., Awaitable[types.CompleteResult]]) -> None:
        self._completion = handler

    def add_request_handler(self, method: str, params_type: type, handler: Callable[..., Awaitable[Any]]) -> None:
        """Register a raw request handler (for example ``logging/setLevel``)."""
        self._extra.append((method, params_type, handler))

    def add_notification_handler(self, method: str, params_type: type, handler: Callable[..., Awaitable[None]]) -> None:
        self._extra_notifications.append((method, params_type, handler))

    # -- queries -------------------------------------------------------------------------

    def input_schema(self, name: str) -> dict[str, Any] | None:
        entry = self._tools.get(name)
        return dict(entry[0].input_schema) if entry is not None else None

    @property
    def tool_names(self) -> list[str]:
        return list(self._tools)

    # -- server ---------------------------------------------------------------------------

    def build_server(self, name: str, version: str, instructions: str | None = None) -> Server[Any]:
        """Return a low-level server whose handlers read this registry."""
        handlers: dict[str, Any] = {
            "on_list_tools": self._list_tools,
            "on_call_tool": self._call_tool,
        }
        if self._resources or self._templates:
            handlers["on_list_resources"] = self._list_resources
            handlers["on_list_resource_templates"] = self._list_templates
            handlers["on_read_resource"] = self._read_resource
        if self._prompts:
            handlers["on_list_prompts"] = self._list_prompts
            handlers["on_get_prompt"] = self._get_prompt
        if self._completion is not None:
            handlers["on_completion"] = self._completion
        server: Server[Any] = Server(name, version=version, instructions=instructions, **handlers)
        for method, params_type, handler in self._extra:
            server.add_request_handler(method, params_type, handler)
        for method, params_type, handler in self._extra_notifications:
            server.add_notification_handler(method, params_type, handler)
        return server

    async def _list_tools(self, ctx: Any, params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[tool for tool, _ in self._tools.values()])

    async def _call_tool(self, ctx: Any, params: types.CallToolRequestParams) -> Any:
        entry = self._tools.get(params.name)
        if entry is None:
            raise MCPError(code=INVALID_PARAMS, message=f"Unknown tool {params.name!r}; call tools/list for the names")
        _, handler = entry
        return await handler(ctx, dict(params.arguments or {}))

    async def _list_resources(self, ctx: Any, params: Any) -> types.ListResourcesResult:
        return types.ListResourcesResult(resources=[resource for resource, _ in self._resources.values()])

    async def _list_templates(self, ctx: Any, params: Any) -> types.ListResourceTemplatesResult:
        return types.ListResourceTemplatesResult(resource_templates=[t.template for t in self._templates])

    async def _read_resource(self, ctx: Any, params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
        uri = str(params.uri)
        entry = self._resources.get(uri)
        if entry is not None:
            return await entry[1](ctx, uri)
        for template in self._templates:
            if template.matches(uri):
                return await template.reader(ctx, uri)
        raise MCPError(code=-32002, message=f"Resource not found: {uri}")

    async def _list_prompts(self, ctx: Any, params: Any) -> types.ListPromptsResult:
        return types.ListPromptsResult(prompts=[prompt for prompt, _ in self._prompts.values()])

    async def _get_prompt(self, ctx: Any, params: types.GetPromptRequestParams) -> types.GetPromptResult:
        entry = self._prompts.get(params.name)
        if entry is None:
            raise MCPError(code=INVALID_PARAMS, message=f"Unknown prompt {params.name!r}")
        return await entry[1](ctx, dict(params.arguments or {}))


def load_plugins(registry: McpRegistry, names: list[str]) -> list[str]:
    """Run every installed plug-in of the entry-point group, then those named ``module:function``.

    Return the names loaded. Raise ``ValueError`` for a name that cannot be imported.
    """
    loaded: list[str] = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        entry.load()(registry)
        loaded.append(entry.name)
    for name in names:
        module_name, _, attribute = name.partition(":")
        if not module_name or not attribute:
            raise ValueError(f"EXECUTOR_MCP_PLUGINS entry {name!r} must look like package.module:function")
        try:
            register = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"Cannot load MCP plug-in {name!r}: {exc}") from None
        register(registry)
        loaded.append(name)
    if loaded:
        log.info("Loaded MCP plug-ins: %s", ", ".join(loaded))
    return loaded
