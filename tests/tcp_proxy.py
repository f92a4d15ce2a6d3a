"""A loopback TCP forwarder for outage tests: `python tcp_proxy.py LISTEN_PORT TARGET_PORT`.

It sits between the pipeline and the S3 test server. Killing this process (SIGKILL) drops every
connection and refuses new ones, as an unreachable store does; starting it again on the same port
ends the outage, and the server behind it keeps its buckets (moto holds them in memory, so
restarting moto itself would lose them). It prints "ready" once it listens.
"""

from __future__ import annotations

import asyncio
import sys


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def _serve(listen_port: int, target_port: int) -> None:
    async def forward(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(_pipe(client_r, server_w), _pipe(server_r, client_w))

    # reuse_address (asyncio's default on Unix) lets a restarted proxy bind the port at once.
    server = await asyncio.start_server(forward, "127.0.0.1", listen_port, reuse_address=True)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(_serve(int(sys.argv[1]), int(sys.argv[2])))
