"""MCP tool calls over stdio through the official Python SDK (`mcp==2.3.0`), sequential: what a
typical Python agent sees (the client, not the server, is the bottleneck here; server throughput
is measured by crates/gateway/examples/mcp_load).

    mcp_stdio.py N TOOL ARGS_JSON -- CMD...

Prints one JSON line: mode, calls, seconds, calls/s, errors.
"""

import asyncio
import json
import os
import sys
import time


async def sdk(n, tool, args, cmd):
    from mcp import Client, StdioServerParameters
    params = StdioServerParameters(command=cmd[0], args=cmd[1:], env=dict(os.environ))
    errors = 0
    async with Client(params) as client:
        await client.call_tool(tool, args)
        start = time.perf_counter()
        for _ in range(n):
            r = await client.call_tool(tool, args)
            errors += bool(r.is_error)
        elapsed = time.perf_counter() - start
    return elapsed, errors


def main():
    n, tool, args = int(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
    cmd = sys.argv[sys.argv.index("--") + 1:]
    elapsed, errors = asyncio.run(sdk(n, tool, args, cmd))
    print(json.dumps({"mode": "sdk", "calls": n, "seconds": round(elapsed, 3),
                      "calls_per_s": round(n / elapsed), "errors": errors}))


main()
