// Drives the service with the official TypeScript SDK client, for tests/test_typescript_client.py.
// Usage: node ts_client.mjs URL API_KEY; prints one JSON line with what the session saw.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";

const [url, apiKey] = process.argv.slice(2);
const transport = new StreamableHTTPClientTransport(new URL(url), {
  requestInit: { headers: { "X-API-Key": apiKey } },
});
const client = new Client({ name: "executor-tornado-ts-test", version: "1.0.0" });
await client.connect(transport);
const sessionId = transport.sessionId;
const protocolVersion = transport.protocolVersion;
const tools = await client.listTools();
const result = await client.callTool({ name: "execute", arguments: { code: "x = 40\nx + 2" } });
await transport.terminateSession();
await client.close();
console.log(JSON.stringify({
  sessionId,
  protocolVersion,
  tools: tools.tools.map((tool) => tool.name),
  structuredContent: result.structuredContent,
}));
