"""MCP tool-call throughput over stdio, same client for both servers.

    mcp_stdio.py raw N TOOL ARGS_JSON -- CMD...   pipelined JSON-RPC (32 in flight): server throughput
    mcp_stdio.py sdk N TOOL ARGS_JSON -- CMD...   the official Python SDK (`mcp==2.3.0`), sequential calls

Prints one JSON line: mode, calls, seconds, calls/s, errors.
"""

import asyncio
import json
import os
import subprocess
import sys
import threading
import time


def raw(n, tool, args, cmd):
    p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out = p.stdout

    def send(msg):
        p.stdin.write((json.dumps(msg) + "\n").encode())
        p.stdin.flush()

    send({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}}})
    out.readline()
    send({"jsonrpc": "2.0", "method": "notifications/initialized"})
    window = threading.Semaphore(32)
    body = [json.dumps({"jsonrpc": "2.0", "id": i + 1, "method": "tools/call",
                        "params": {"name": tool, "arguments": args}}) + "\n" for i in range(n)]

    def writer():
        for line in body:
            window.acquire()
            p.stdin.write(line.encode())
            p.stdin.flush()

    start = time.perf_counter()
    t = threading.Thread(target=writer)
    t.start()
    errors = 0
    got = 0
    while got < n:
        line = out.readline()
        if not line:
            raise SystemExit("server closed stdout")
        msg = json.loads(line)
        if "id" not in msg:
            continue
        got += 1
        window.release()
        if "error" in msg or msg.get("result", {}).get("isError"):
            errors += 1
    elapsed = time.perf_counter() - start
    t.join()
    p.stdin.close()
    p.wait(timeout=10)
    return elapsed, errors


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
    mode, n, tool, args = sys.argv[1], int(sys.argv[2]), sys.argv[3], json.loads(sys.argv[4])
    cmd = sys.argv[sys.argv.index("--") + 1:]
    if mode == "raw":
        elapsed, errors = raw(n, tool, args, cmd)
    else:
        elapsed, errors = asyncio.run(sdk(n, tool, args, cmd))
    print(json.dumps({"mode": mode, "calls": n, "seconds": round(elapsed, 3),
                      "calls_per_s": round(n / elapsed), "errors": errors}))


main()
