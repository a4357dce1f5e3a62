"""A real MCP client (the official Python SDK, `pip install mcp==2.3.0`) against referee.

    client.py http URL TOKEN     Streamable HTTP with a bearer token
    client.py stdio CMD ARG...   `referee mcp` over stdin/stdout

Lists the tools, calls `muscle.feanor`, calls `fs_read` on $MCP_READ_PATH when that tool is
listed, and prints one JSON object with what it saw. Exit 0 only if every call succeeded.
"""

import asyncio
import json
import os
import sys

import httpx2
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client


async def exercise(client):
    listed = await client.list_tools()
    tools = {t.name: t for t in listed.tools}
    report = {
        "tools": sorted(tools),
        "annotations": {
            name: {
                "read_only": t.annotations.read_only_hint if t.annotations else None,
                "destructive": t.annotations.destructive_hint if t.annotations else None,
                "idempotent": t.annotations.idempotent_hint if t.annotations else None,
            }
            for name, t in tools.items()
        },
        "output_schema": {name: t.output_schema is not None for name, t in tools.items()},
    }
    feanor = await client.call_tool("muscle.feanor", {"input": [1, 2, 3, 4]})
    report["feanor"] = {"is_error": feanor.is_error, "structured": feanor.structured_content}
    path = os.environ.get("MCP_READ_PATH")
    if path and "fs_read" in tools:
        read = await client.call_tool("fs_read", {"path": path})
        report["fs_read"] = {"is_error": read.is_error, "structured": read.structured_content}
    return report


async def main():
    mode = sys.argv[1]
    if mode == "http":
        url, token = sys.argv[2], sys.argv[3]
        http = httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=30)
        async with http:
            async with Client(streamable_http_client(url, http_client=http)) as client:
                report = await exercise(client)
    elif mode == "stdio":
        params = StdioServerParameters(command=sys.argv[2], args=sys.argv[3:], env=dict(os.environ))
        async with Client(params) as client:
            report = await exercise(client)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    print(json.dumps(report))
    failed = report["feanor"]["is_error"] or report.get("fs_read", {}).get("is_error")
    sys.exit(1 if failed else 0)


asyncio.run(main())
