"""A TCP proxy on 127.0.0.1 with a switch that cuts, stalls or restores every connection.

Tests put it in front of the SQS endpoint or the phrase API to make an outage on demand:

    with TcpProxy(target_port=sqs_port) as proxy:
        ...                     # clients use proxy.url
        proxy.cut()             # reset every open connection and every new one
        proxy.cut(refuse=True)  # or close the listening socket: connects get ECONNREFUSED
        proxy.stall()           # or keep connections open but forward no byte
        proxy.restore()         # forward again

With `capture_dir`, the bytes of each connection are written to `<n>-up.bin` (client to
target) and `<n>-down.bin` (target to client), so a test can inspect what went over the
wire. Command line, for a manual outage: `python -m stack.tcp_proxy --port 9325
--target-port 9324`, then SIGUSR1 cuts and SIGUSR2 restores.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import logging
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"

#: Bytes read from a socket at once.
CHUNK_BYTES = 65_536

#: Seconds the accept loop waits for a connection before it checks the switch again.
ACCEPT_POLL_S = 0.05

#: Seconds a new connection waits for the target to accept it.
CONNECT_TIMEOUT_S = 5.0

#: Seconds `stop()` waits for the accept thread to exit.
STOP_JOIN_TIMEOUT_S = 5.0

#: SO_LINGER with a zero timeout: close() then sends RST instead of FIN.
_RESET_ON_CLOSE = struct.pack("ii", 1, 0)


class ProxyState(enum.Enum):
    """Position of the proxy's switch."""

    OPEN = "open"  # forward bytes both ways
    RESET = "reset"  # reset every open and every new connection
    REFUSE = "refuse"  # reset every open connection, listening socket closed
    STALL = "stall"  # accept and hold connections, forward nothing


@dataclass
class ProxyCounters:
    """Connection counts since start, for tests to check that clients kept trying."""

    accepted: int = 0
    reset: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


class _Connection:
    """One client connection and its connection to the target."""

    def __init__(self, number: int, client: socket.socket, target: socket.socket) -> None:
        self.number = number
        self.client = client
        self.target = target
        self.closed = threading.Event()

    def reset(self) -> None:
        """Close both sockets, the client one with RST. Safe to repeat."""
        if self.closed.is_set():
            return
        self.closed.set()

        # close() alone neither wakes a thread blocked in recv() on the socket nor frees
        # it, so no RST would leave until that recv() returned. shutdown(SHUT_RD) wakes
        # the pump, and the last close then sends RST because of the zero linger.
        with contextlib.suppress(OSError):
            self.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        with contextlib.suppress(OSError):
            self.client.shutdown(socket.SHUT_RD)
        with contextlib.suppress(OSError):
            self.target.shutdown(socket.SHUT_RDWR)
        for sock in (self.client, self.target):
            with contextlib.suppress(OSError):
                sock.close()

    def close(self) -> None:
        """Close both sockets normally. Safe to repeat."""
        if self.closed.is_set():
            return
        self.closed.set()
        for sock in (self.client, self.target):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()


class TcpProxy:
    """Forward connections from 127.0.0.1:`port` to `target_host`:`target_port`.

    `port=0` picks a free port. Use as a context manager, or call `start()` and `stop()`.
    The switch methods (`cut`, `stall`, `restore`) take effect at once for open
    connections and within ACCEPT_POLL_S for the listening socket.
    """

    def __init__(
        self,
        target_port: int,
        target_host: str = HOST,
        port: int = 0,
        capture_dir: Path | None = None,
    ) -> None:
        self.target = (target_host, target_port)
        self.capture_dir = capture_dir
        self.counters = ProxyCounters()
        self._port = port
        self._state = ProxyState.OPEN
        self._flowing = threading.Event()
        self._flowing.set()
        self._stopping = threading.Event()
        self._connections: dict[int, _Connection] = {}
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> TcpProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._port

    @property
    def url(self) -> str:
        """Return `http://127.0.0.1:<port>`, the endpoint URL clients should use."""
        return f"http://{HOST}:{self._port}"

    @property
    def state(self) -> ProxyState:
        return self._state

    def start(self) -> TcpProxy:
        """Bind the listening socket and start accepting. Raises OSError if the bind fails."""
        if self.capture_dir is not None:
            self.capture_dir.mkdir(parents=True, exist_ok=True)
        self._listener = self._listen()
        self._port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._accept_loop, name="tcp-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting and close every connection. Safe to repeat."""
        self._stopping.set()
        self._flowing.set()
        if self._thread is not None:
            self._thread.join(STOP_JOIN_TIMEOUT_S)
            self._thread = None
        for connection in self._take_connections():
            connection.close()

    def cut(self, refuse: bool = False) -> None:
        """Reset every open connection, and every new one until `restore()`.

        With `refuse`, the listening socket is closed instead, so that connects fail
        with ECONNREFUSED, as when the endpoint's process is down.
        """
        self._state = ProxyState.REFUSE if refuse else ProxyState.RESET
        self._flowing.set()
        for connection in self._take_connections():
            connection.reset()
            self._count(reset=1)
        logger.info("proxy %s: cut (%s)", self.url, self._state.value)

    def stall(self) -> None:
        """Keep connections open and accept new ones, but forward no byte until `restore()`."""
        self._state = ProxyState.STALL
        self._flowing.clear()
        logger.info("proxy %s: stalled", self.url)

    def restore(self) -> None:
        """Forward bytes again; a closed listening socket is bound again on the same port."""
        self._state = ProxyState.OPEN
        self._flowing.set()
        logger.info("proxy %s: restored", self.url)

    def _listen(self) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((HOST, self._port))
        listener.listen(128)
        listener.settimeout(ACCEPT_POLL_S)
        return listener

    def _accept_loop(self) -> None:
        number = 0
        while not self._stopping.is_set():
            listener = self._listener_for_state()
            if listener is None:
                time.sleep(ACCEPT_POLL_S)
                continue

            try:
                client, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError as exc:
                logger.warning("proxy %s: accept failed: %s", self.url, exc)
                time.sleep(ACCEPT_POLL_S)
                continue

            number += 1
            self._count(accepted=1)
            self._handle_new(number, client)

        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _listener_for_state(self) -> socket.socket | None:
        """Close the listening socket while refusing, bind it again afterwards."""
        if self._state is ProxyState.REFUSE:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            return None

        if self._listener is None:
            try:
                self._listener = self._listen()
            except OSError as exc:
                logger.warning("proxy %s: bind again failed, will retry: %s", self.url, exc)
                return None
        return self._listener

    def _handle_new(self, number: int, client: socket.socket) -> None:
        if self._is_cut():
            _reset_socket(client)
            self._count(reset=1)
            return

        try:
            target = socket.create_connection(self.target, timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            logger.warning("proxy %s: target %s:%d unreachable: %s", self.url, *self.target, exc)
            _reset_socket(client)
            return

        client.settimeout(None)
        target.settimeout(None)
        connection = _Connection(number, client, target)
        with self._lock:
            # cut() sets the state before it takes the connections under this lock, so a
            # connection made while it ran is either reset there or here.
            registered = not self._is_cut()
            if registered:
                self._connections[number] = connection
        if not registered:
            connection.reset()
            self._count(reset=1)
            return

        for direction in ("up", "down"):
            threading.Thread(
                target=self._pump,
                args=(connection, direction),
                name=f"tcp-proxy-{number}-{direction}",
                daemon=True,
            ).start()

    def _pump(self, connection: _Connection, direction: str) -> None:
        """Copy bytes one way until either side closes, holding them while stalled."""
        source, sink = (
            (connection.client, connection.target)
            if direction == "up"
            else (connection.target, connection.client)
        )
        capture = self._open_capture(connection.number, direction)
        try:
            while True:
                chunk = source.recv(CHUNK_BYTES)
                if not chunk:
                    break
                self._flowing.wait()
                if connection.closed.is_set():
                    break
                sink.sendall(chunk)
                self._count(**{f"bytes_{direction}": len(chunk)})
                if capture is not None:
                    capture.write(chunk)
        except OSError:
            pass  # the other side closed or the proxy reset the connection
        finally:
            if capture is not None:
                capture.close()
            with self._lock:
                self._connections.pop(connection.number, None)
            connection.close()

    def _open_capture(self, number: int, direction: str) -> BinaryIO | None:
        if self.capture_dir is None:
            return None
        return (self.capture_dir / f"{number}-{direction}.bin").open("wb")

    def _is_cut(self) -> bool:
        return self._state in (ProxyState.RESET, ProxyState.REFUSE)

    def _take_connections(self) -> list[_Connection]:
        with self._lock:
            connections = list(self._connections.values())
            self._connections.clear()
        return connections

    def _count(self, **increments: int) -> None:
        with self.counters.lock:
            for name, value in increments.items():
                setattr(self.counters, name, getattr(self.counters, name) + value)


def _reset_socket(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
    with contextlib.suppress(OSError):
        sock.close()


def main(argv: list[str] | None = None) -> int:
    """Run a proxy until SIGTERM or SIGINT; SIGUSR1 cuts it and SIGUSR2 restores it."""
    parser = argparse.ArgumentParser(prog="python -m stack.tcp_proxy", description=__doc__)
    parser.add_argument("--port", type=int, default=0, help="port to listen on (default: free)")
    parser.add_argument("--target-port", type=int, required=True, help="port to forward to")
    parser.add_argument("--target-host", default=HOST, help=f"host to forward to (default {HOST})")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    stopping = threading.Event()
    proxy = TcpProxy(args.target_port, args.target_host, args.port).start()
    signal.signal(signal.SIGUSR1, lambda *_: proxy.cut())
    signal.signal(signal.SIGUSR2, lambda *_: proxy.restore())
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())

    print(
        f"tcp-proxy listening on {proxy.url}, forwarding to {args.target_host}:{args.target_port}"
    )
    sys.stdout.flush()
    while not stopping.wait(0.5):
        pass
    proxy.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
