"""A bare Tornado handler returning a fixed JSON-RPC tools/call body: the ceiling for anything on Tornado.

Usage: python peer_tornado.py PORT
"""

from __future__ import annotations

import asyncio
import json
import sys

import tornado.web

RESULT = json.dumps({"content": [{"type": "text", "text": "ok"}], "isError": False})


class FixedHandler(tornado.web.RequestHandler):
    def post(self) -> None:
        # The load generator matches the JSON-RPC id, so echo it back.
        request_id = json.loads(self.request.body).get("id") if self.request.body else None
        if request_id is None:
            self.set_status(202)
            return
        self.set_header("Content-Type", "application/json")
        self.finish(f'{{"jsonrpc":"2.0","id":{json.dumps(request_id)},"result":{RESULT}}}')


async def main() -> None:
    app = tornado.web.Application([(r"/mcp", FixedHandler)])
    app.listen(int(sys.argv[1]), "127.0.0.1", xheaders=False)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
