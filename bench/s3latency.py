"""An object store's latency at the network boundary: a TCP proxy on 127.0.0.1 in front of S3.

The small-file benchmark talks S3 to a real server (SeaweedFS on loopback), which answers in
well under a millisecond; a real object store takes tens. This proxy sits between the client
(s3fs) and the server and applies the worker benchmark's latency model (``bench/latencyfs.py``,
the same defaults and environment variables): each request waits ``first_byte_s`` (20 ms)
before the server sees it, and every connection moves at most ``bandwidth_mbs`` (100 MB/s) in
each direction, so a response of n bytes arrives ``first_byte_s + n / bandwidth`` after the
request, as from ``latency://``. A request is a burst of bytes from the client after the
connection was idle or the server last spoke (HTTP/1.1 keeps one request in flight per
connection), so concurrency comes only from more connections, as with a real store.

Run in a thread of the benchmark's main process (:class:`LatencyProxy` is a context manager);
it counts requests and bytes for the report.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from typing import Any

from bench.latencyfs import DEFAULT_BANDWIDTH_MBS, DEFAULT_LATENCY_S, _env_float

CHUNK = 256 * 1024


@dataclasses.dataclass
class Traffic:
    """What went through the proxy: requests (client bursts), bytes each way, connections."""

    requests: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    connections: int = 0
    max_open: int = 0  # most connections open at once: the concurrency the store saw
    open: int = 0

    def snapshot(self) -> dict[str, int]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "open"}


class _Pacer:
    """One direction of one connection: at most ``bandwidth`` bytes/s, scheduled ahead."""

    def __init__(self, bandwidth: float) -> None:
        self.bandwidth = bandwidth
        self.free_at = 0.0

    async def pace(self, nbytes: int) -> None:
        now = time.monotonic()
        self.free_at = max(self.free_at, now) + nbytes / self.bandwidth
        await asyncio.sleep(self.free_at - now)


class LatencyProxy:
    """Forwards 127.0.0.1:``port`` to ``upstream`` with the latency model applied."""

    def __init__(
        self, upstream: tuple[str, int], first_byte_s: float | None = None, bandwidth_mbs: float | None = None
    ) -> None:
        self.upstream = upstream
        self.first_byte_s = (
            first_byte_s if first_byte_s is not None else _env_float("ANTBATCH_BENCH_LATENCY_S", DEFAULT_LATENCY_S)
        )
        mbs = (
            bandwidth_mbs
            if bandwidth_mbs is not None
            else _env_float("ANTBATCH_BENCH_BANDWIDTH_MBS", DEFAULT_BANDWIDTH_MBS)
        )
        self.bandwidth = mbs * 1e6
        self.traffic = Traffic()
        self.port = 0
        self.thread_id: int | None = None  # the proxy thread's native id, for its CPU time
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="s3-latency-proxy", daemon=True)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LatencyProxy:
        self._thread.start()
        if not self._ready.wait(10) or not self.port:
            raise RuntimeError("the S3 latency proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(10)

    def counts(self) -> dict[str, int]:
        return self.traffic.snapshot()

    def _run(self) -> None:
        self.thread_id = threading.get_native_id()
        asyncio.run(self._serve())

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stopped.wait()

    async def _connection(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        try:
            server_in, server_out = await asyncio.open_connection(*self.upstream)
        except OSError:
            client_out.close()
            return
        traffic = self.traffic
        traffic.connections += 1
        traffic.open += 1
        traffic.max_open = max(traffic.max_open, traffic.open)
        # True while the next client bytes start a new request: at the start and after a reply.
        turn = {"new_request": True}
        try:
            await asyncio.gather(
                self._pump(client_in, server_out, turn, upstream=True),
                self._pump(server_in, client_out, turn, upstream=False),
            )
        finally:
            traffic.open -= 1
            for writer in (server_out, client_out):
                with contextlib.suppress(Exception):
                    writer.close()

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, turn: dict[str, Any], *, upstream: bool
    ) -> None:
        pacer = _Pacer(self.bandwidth)
        try:
            while data := await source.read(CHUNK):
                if upstream:
                    if turn["new_request"]:
                        turn["new_request"] = False
                        self.traffic.requests += 1
                        await asyncio.sleep(self.first_byte_s)
                    self.traffic.bytes_up += len(data)
                else:
                    turn["new_request"] = True
                    self.traffic.bytes_down += len(data)
                await pacer.pace(len(data))
                sink.write(data)
                await sink.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                sink.write_eof()
