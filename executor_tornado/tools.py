"""The tool catalog: every tool agent code can call through the ``tools`` module.

A tool is a :class:`ToolSpec`: a dotted path below ``tools`` (``kv.get``),
a description, a JSON Schema for its input, a default approval mode and an
async handler. The catalog contains three kinds of tools:

* ``catalog.namespaces``, ``catalog.tools`` and ``discover``, which list the
  catalog itself;
* the built-in ``kv`` namespace (``get``, ``set``, ``delete``, ``list``), a
  key-value store scoped to the calling workspace and kept in the store;
* plug-in tools from the entry-point group ``executor_tornado.tools``.

Plug-in contract. A distribution declares, in ``setup.cfg``::

    [options.entry_points]
    executor_tornado.tools =
        demo = demo_tools:tools

The entry point's name is the plug-in's namespace: every tool path it
declares starts with ``<name>.`` (``demo.echo``), and the names ``catalog``,
``discover`` and ``kv`` are reserved. The object the entry point loads is a
list of tools, or a callable taking no arguments that returns one. Each
tool is a :class:`ToolSpec` or a mapping with the same keys (``path``,
``description``, ``handler``, optional ``input_schema`` and ``approval``), so
a plug-in does not have to import this package. The handler is called as
``await handler(arguments, context)`` with the validated input ``dict`` and
a :class:`ToolContext`, and returns a JSON-compatible value. An exception it
raises reaches the agent's code at the call site: ``ValueError``,
``TypeError``, ``KeyError``, ``LookupError``, ``PermissionError``,
``TimeoutError``, ``NotImplementedError`` and ``OSError`` keep their type and
message. Any other exception is logged and reaches the code as a
``RuntimeError`` without its message.

Example::

    catalog = ToolCatalog(kv_tools(store) + load_plugin_tools())
    catalog.discover(query="echo")   # [{"path": "demo.echo", ...}]
    value = await catalog.invoke("demo.echo", {"text": "hi"}, context)
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import jsonschema
import jsonschema.exceptions
import jsonschema.validators

from executor_tornado.sandbox import json_size, to_json_compatible

if TYPE_CHECKING:
    from executor_tornado.clock import Clock
    from store.base import Store

__all__ = [
    "APPROVAL_MODES",
    "CATALOG_PATHS",
    "ENTRY_POINT_GROUP",
    "KV_MAX_KEY_CHARS",
    "KV_MAX_VALUE_BYTES",
    "PluginError",
    "ToolCatalog",
    "ToolContext",
    "ToolHandler",
    "ToolInputError",
    "ToolSpec",
    "kv_tools",
    "load_plugin_tools",
]

tools_log = logging.getLogger("executor_tornado.tools")

ENTRY_POINT_GROUP: Final = "executor_tornado.tools"
APPROVAL_MODES: Final = ("auto", "required", "deny")
CATALOG_PATHS: Final = frozenset({"catalog.namespaces", "catalog.tools", "discover"})
"""Tools that only read the catalog. Approval policies do not apply to them."""
RESERVED_NAMESPACES: Final = frozenset({"catalog", "discover", "kv"})

KV_MAX_KEY_CHARS: Final = 256
KV_MAX_VALUE_BYTES: Final = 256 * 1024
"""Largest ``kv`` value, measured as compact UTF-8 JSON."""

_DEFAULT_LIST_LIMIT = 50
_MAX_LIST_LIMIT = 500
_PASSED_THROUGH_ERRORS = (
    ValueError,
    TypeError,
    LookupError,
    PermissionError,
    TimeoutError,
    NotImplementedError,
    OSError,
)
_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True)
class ToolContext:
    """Who is calling a tool, passed to every handler.

    ``sandbox_pid`` is the process id of the sandbox worker running the
    calling code, for diagnostics, or ``None`` when unknown.
    """

    workspace_id: str
    account_id: str
    principal: str
    task_id: str
    sandbox_pid: int | None = None


ToolHandler = Callable[[dict[str, Any], ToolContext], Awaitable[Any]]
"""``await handler(arguments, context)``: run a tool on validated input."""


class ToolInputError(ValueError):
    """The input of a tool call does not match the tool's input schema."""


class PluginError(Exception):
    """A plug-in entry point could not be loaded or declares invalid tools."""


def _object_schema() -> dict[str, Any]:
    return {"type": "object"}


@dataclass(frozen=True)
class ToolSpec:
    """One tool: its path below ``tools``, description, input schema, default approval mode and handler.

    ``input_schema`` is a JSON Schema for the ``dict`` of arguments: the
    keyword arguments of the call, plus positional arguments, which fill the
    schema's ``properties`` in their declared order. ``approval`` is the mode
    used when no workspace policy matches: ``auto`` runs the call,
    ``required`` pauses the run until a person approves it, ``deny`` never
    runs it. Raise :class:`ValueError` for an invalid path, mode or schema.
    """

    path: str
    description: str
    handler: ToolHandler
    input_schema: Mapping[str, Any] = field(default_factory=_object_schema)
    approval: str = "auto"

    def __post_init__(self) -> None:
        parts = self.path.split(".") if isinstance(self.path, str) else []
        if not parts or not all(part.isidentifier() and not part.startswith("_") for part in parts):
            raise ValueError(
                f"Invalid tool path {self.path!r}: use dotted Python identifiers without a leading underscore"
            )
        if not isinstance(self.description, str) or not self.description.strip():
            raise ValueError(f"Tool {self.path!r} has no description")
        if not isinstance(self.input_schema, Mapping):
            raise ValueError(f"Tool {self.path!r} has an input schema that is not a JSON object")
        if not callable(self.handler):
            raise ValueError(f"Tool {self.path!r} has a handler that is not callable: {self.handler!r}")
        if self.approval not in APPROVAL_MODES:
            raise ValueError(
                f"Tool {self.path!r} has the invalid approval mode {self.approval!r}: "
                f"use one of {', '.join(APPROVAL_MODES)}"
            )
        try:
            jsonschema.validators.validator_for(self.input_schema).check_schema(self.input_schema)
        except jsonschema.exceptions.SchemaError as error:
            raise ValueError(f"Tool {self.path!r} has an invalid input schema: {error.message}") from error
        if self.input_schema.get("type", "object") != "object":
            raise ValueError(f"Tool {self.path!r} must take an object as input, not {self.input_schema['type']!r}")

    @property
    def namespace(self) -> str:
        """The first segment of the path, or ``""`` for a top-level tool such as ``discover``."""
        return self.path.split(".", 1)[0] if "." in self.path else ""

    def describe(self, approval: str | None = None) -> dict[str, Any]:
        """Return the JSON description of the tool that agents see in listings."""
        return {
            "path": self.path,
            "call": f"tools.{self.path}(...)",
            "description": self.description,
            "inputSchema": dict(self.input_schema),
            "approval": approval or self.approval,
        }


ApprovalResolver = Callable[[ToolSpec], str]
"""Return the effective approval mode of a tool for the caller's workspace."""


class ToolCatalog:
    """The tools of the service, by path, with the listing tools built in.

    The catalog is the same for every workspace, while approval policies
    and the ``kv`` data belong to one workspace.
    """

    def __init__(self, specs: Iterable[ToolSpec] = ()) -> None:
        self._specs: dict[str, ToolSpec] = {}
        for spec in self._listing_tools():
            self._specs[spec.path] = spec
        for spec in specs:
            self.add(spec)

    def add(self, spec: ToolSpec) -> None:
        """Add a tool. Raise :class:`ValueError` when its path is taken or clashes with a namespace."""
        if spec.path in self._specs:
            raise ValueError(f"Duplicate tool path {spec.path!r}")
        for existing in self._specs:
            if existing.startswith(spec.path + ".") or spec.path.startswith(existing + "."):
                raise ValueError(f"Tool path {spec.path!r} clashes with the tool {existing!r}")
        self._specs[spec.path] = spec

    def get(self, path: str) -> ToolSpec | None:
        return self._specs.get(path)

    def paths(self) -> list[str]:
        """Return every callable path, sorted."""
        return sorted(self._specs)

    # -- listings ----------------------------------------------------------------

    def namespaces(self) -> list[dict[str, Any]]:
        """Return ``[{"name": ..., "tools": count}]`` for every namespace, sorted by name."""
        counts: dict[str, int] = {}
        for spec in self._specs.values():
            if spec.namespace:
                counts[spec.namespace] = counts.get(spec.namespace, 0) + 1
        return [{"name": name, "tools": counts[name]} for name in sorted(counts)]

    def tools(
        self,
        namespace: str | None = None,
        query: str | None = None,
        limit: int = _DEFAULT_LIST_LIMIT,
        *,
        approval_for: ApprovalResolver | None = None,
    ) -> list[dict[str, Any]]:
        """List tools sorted by path, optionally in one namespace and matching every word of ``query``.

        ``approval_for`` gives each listed tool its effective approval mode.
        Without it the listing shows the tool's default.
        """
        words = _words(query)
        selected = []
        for path in self.paths():
            spec = self._specs[path]
            if namespace and spec.namespace != namespace:
                continue
            if words and not all(word in _search_text(spec) for word in words):
                continue
            selected.append(spec)
        return [self._describe(spec, approval_for) for spec in selected[: _clamp_limit(limit)]]

    def discover(
        self, query: str = "", limit: int = 10, *, approval_for: ApprovalResolver | None = None
    ) -> list[dict[str, Any]]:
        """Return the tools that best match ``query``, best first.

        A query word equal to a path segment scores 3, one inside the path
        scores 2 and one in the description scores 1. Tools scoring 0 are
        left out, and an empty query lists every tool by path.
        """
        words = _words(query)
        scored = []
        for path in self.paths():
            spec = self._specs[path]
            score = _match_score(spec, words)
            if words and score == 0:
                continue
            scored.append((-score, path, spec))
        scored.sort(key=lambda item: (item[0], item[1]))
        return [self._describe(spec, approval_for) for _, _, spec in scored[: _clamp_limit(limit)]]

    def _describe(self, spec: ToolSpec, approval_for: ApprovalResolver | None) -> dict[str, Any]:
        return spec.describe(approval_for(spec) if approval_for else None)

    # -- calls --------------------------------------------------------------------

    def arguments(self, spec: ToolSpec, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """Merge a call's positional and keyword arguments into the input ``dict``.

        Positional arguments fill the schema's ``properties`` in order. Raise
        :class:`TypeError` for too many positional arguments or an argument
        given twice.
        """
        arguments = dict(kwargs)
        if not args:
            return arguments
        names = list(spec.input_schema.get("properties", {}))
        if len(args) > len(names):
            raise TypeError(
                f"tools.{spec.path}() takes at most {len(names)} positional arguments "
                f"({', '.join(names) or 'none'}) but {len(args)} were given"
            )
        for name, value in zip(names, args):
            if name in arguments:
                raise TypeError(f"tools.{spec.path}() got multiple values for argument {name!r}")
            arguments[name] = value
        return arguments

    def validate(self, spec: ToolSpec, arguments: Mapping[str, Any]) -> None:
        """Raise :class:`ToolInputError` unless ``arguments`` match the tool's input schema."""
        validator_class = jsonschema.validators.validator_for(spec.input_schema)
        validator = validator_class(spec.input_schema)
        error = jsonschema.exceptions.best_match(validator.iter_errors(dict(arguments)))
        if error is None:
            return
        location = "/".join(str(part) for part in error.absolute_path)
        where = f" at {location!r}" if location else ""
        raise ToolInputError(f"Invalid input for tools.{spec.path}{where}: {error.message}")

    async def invoke(self, spec: ToolSpec, arguments: dict[str, Any], context: ToolContext) -> Any:
        """Validate ``arguments``, run the tool and return its JSON-compatible result.

        Raise :class:`ToolInputError` for invalid input. Handler exceptions
        of the kinds listed in the module docstring propagate. Any other is
        logged and replaced by a :class:`RuntimeError`.
        """
        self.validate(spec, arguments)
        try:
            result = spec.handler(arguments, context)
            if inspect.isawaitable(result):
                result = await result
        except _PASSED_THROUGH_ERRORS:
            raise
        except Exception as error:
            tools_log.exception(
                "Tool %s failed in task %s of workspace %s", spec.path, context.task_id, context.workspace_id
            )
            raise RuntimeError(
                f"tools.{spec.path} failed with an internal error ({type(error).__name__}). "
                "The service log has the details."
            ) from error
        return to_json_compatible(result)

    # -- the listing tools ---------------------------------------------------------

    def _listing_tools(self) -> list[ToolSpec]:
        limit_schema = {"type": "integer", "minimum": 1, "maximum": _MAX_LIST_LIMIT}

        async def namespaces(arguments: dict[str, Any], context: ToolContext) -> Any:
            return self.namespaces()

        async def tools(arguments: dict[str, Any], context: ToolContext) -> Any:
            return self.tools(**arguments)

        async def discover(arguments: dict[str, Any], context: ToolContext) -> Any:
            return self.discover(**arguments)

        return [
            ToolSpec(
                path="catalog.namespaces",
                description="List the tool namespaces with the number of tools in each.",
                handler=namespaces,
                input_schema={"type": "object", "properties": {}, "additionalProperties": False},
            ),
            ToolSpec(
                path="catalog.tools",
                description=(
                    "List tools with their input schemas and approval modes, optionally in one namespace "
                    "and matching every word of a query."
                ),
                handler=tools,
                input_schema={
                    "type": "object",
                    "properties": {
                        "namespace": {"type": ["string", "null"]},
                        "query": {"type": ["string", "null"]},
                        "limit": limit_schema,
                    },
                    "additionalProperties": False,
                },
            ),
            ToolSpec(
                path="discover",
                description="Find the tools that best match a query, best first.",
                handler=discover,
                input_schema={
                    "type": "object",
                    "properties": {"query": {"type": "string"}, "limit": limit_schema},
                    "additionalProperties": False,
                },
            ),
        ]


def _words(query: str | None) -> list[str]:
    return _WORD.findall(query.lower()) if query else []


def _search_text(spec: ToolSpec) -> str:
    return f"{spec.path} {spec.description}".lower()


def _match_score(spec: ToolSpec, words: list[str]) -> int:
    segments = spec.path.lower().split(".")
    path = spec.path.lower()
    description = spec.description.lower()
    score = 0
    for word in words:
        if word in segments:
            score += 3
        elif word in path:
            score += 2
        elif word in description:
            score += 1
    return score


def _clamp_limit(limit: int) -> int:
    return max(1, min(int(limit), _MAX_LIST_LIMIT))


# -- the kv namespace ----------------------------------------------------------------


def kv_tools(store: Store, clock: Clock | None = None) -> list[ToolSpec]:
    """Build the ``kv`` tools over ``store``, scoped to the calling workspace.

    ``clock.time()`` gives the values' update time, and the default is the wall clock.
    """
    now = clock.time if clock is not None else time.time
    key_schema = {"type": "string", "minLength": 1, "maxLength": KV_MAX_KEY_CHARS}

    async def get(arguments: dict[str, Any], context: ToolContext) -> Any:
        return await store.kv_get(context.workspace_id, arguments["key"])

    async def set_(arguments: dict[str, Any], context: ToolContext) -> Any:
        value = arguments["value"]
        size = json_size(value)
        if size > KV_MAX_VALUE_BYTES:
            raise ToolInputError(
                f"Invalid input for tools.kv.set: the value is {size} bytes of JSON, "
                f"above the limit of {KV_MAX_VALUE_BYTES} bytes"
            )
        await store.kv_set(context.workspace_id, arguments["key"], value, now())
        return None

    async def delete(arguments: dict[str, Any], context: ToolContext) -> Any:
        return await store.kv_delete(context.workspace_id, arguments["key"])

    async def list_(arguments: dict[str, Any], context: ToolContext) -> Any:
        return await store.kv_list(
            context.workspace_id, prefix=arguments.get("prefix", ""), limit=arguments.get("limit", 100)
        )

    return [
        ToolSpec(
            path="kv.get",
            description="Return the value stored under a key in this workspace, or None.",
            handler=get,
            input_schema={
                "type": "object",
                "properties": {"key": key_schema},
                "required": ["key"],
                "additionalProperties": False,
            },
        ),
        ToolSpec(
            path="kv.set",
            description=f"Store a JSON value of at most {KV_MAX_VALUE_BYTES // 1024} KiB under a key in this workspace.",
            handler=set_,
            input_schema={
                "type": "object",
                "properties": {"key": key_schema, "value": {}},
                "required": ["key", "value"],
                "additionalProperties": False,
            },
        ),
        ToolSpec(
            path="kv.delete",
            description="Delete a key in this workspace and return whether it existed.",
            handler=delete,
            input_schema={
                "type": "object",
                "properties": {"key": key_schema},
                "required": ["key"],
                "additionalProperties": False,
            },
        ),
        ToolSpec(
            path="kv.list",
            description="List this workspace's keys that start with a prefix, in sorted order.",
            handler=list_,
            input_schema={
                "type": "object",
                "properties": {
                    "prefix": {"type": "string", "maxLength": KV_MAX_KEY_CHARS},
                    "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
                },
                "additionalProperties": False,
            },
        ),
    ]


# -- plug-ins --------------------------------------------------------------------


def load_plugin_tools(group: str = ENTRY_POINT_GROUP, *, strict: bool = True) -> list[ToolSpec]:
    """Load the tools of every installed plug-in of the entry-point ``group``.

    With ``strict`` a plug-in that fails to load raises :class:`PluginError`.
    Without it the failure is logged and the plug-in is skipped.
    """
    specs: list[ToolSpec] = []
    for entry_point in sorted(importlib.metadata.entry_points(group=group), key=lambda ep: ep.name):
        try:
            loaded = _load_entry_point(entry_point)
        except PluginError as error:
            if strict:
                raise
            tools_log.error("Skipping a plug-in: %s", error)
            continue
        tools_log.info(
            "Loaded %d tools from plug-in %s (%s)", len(loaded), entry_point.name, entry_point.value
        )
        specs.extend(loaded)
    return specs


def _load_entry_point(entry_point: importlib.metadata.EntryPoint) -> list[ToolSpec]:
    label = f"plug-in {entry_point.name!r} ({entry_point.value})"
    if entry_point.name in RESERVED_NAMESPACES:
        raise PluginError(f"The {label} uses the reserved namespace {entry_point.name!r}: rename the entry point")
    try:
        loaded = entry_point.load()
        if callable(loaded):
            loaded = loaded()
    except Exception as error:
        raise PluginError(f"The {label} failed to load: {type(error).__name__}: {error}") from error
    if isinstance(loaded, (str, bytes, Mapping)) or not isinstance(loaded, Iterable):
        raise PluginError(f"The {label} must provide a list of tools, got {type(loaded).__name__}")

    specs = []
    for item in loaded:
        try:
            spec = item if isinstance(item, ToolSpec) else ToolSpec(**dict(item))
        except (TypeError, ValueError) as error:
            raise PluginError(f"The {label} declares an invalid tool {item!r}: {error}") from error
        if not spec.path.startswith(entry_point.name + "."):
            raise PluginError(
                f"The {label} declares the tool {spec.path!r} outside its namespace: "
                f"its paths must start with {entry_point.name + '.'!r}"
            )
        specs.append(spec)
    return specs
