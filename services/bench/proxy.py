"""A TCP proxy on loopback that fails the way links and servers really do, for the chaos run and the fencing tests.

Between clients (workers, trainers) and one upstream (Redis, MLflow) it either passes bytes, or:
- freeze: every connection, and every new one, stays open and nothing passes either way (a Redis that stopped
  answering with its port open, a switch dropping packets, a frozen host); what was sent meanwhile is delivered
  when the freeze ends, late, as a resumed server would read it;
- slow: every chunk is held `delay` seconds before it is passed on (a congested link);
- cut: half the connections, chosen by a seeded RNG, are reset, and each new one with the same odds (a flapping
  link, a load balancer dropping half its flows).
A fault lasts until `heal`.
"""

from __future__ import annotations

import random
import select
import socket
import struct
import threading
import time

MODES = ("pass", "freeze", "slow", "cut")


class Proxy:
    def __init__(self, upstream_host: str, upstream_port: int, seed: int = 0, host: str = "127.0.0.1", port: int = 0):
        self.upstream = (upstream_host, upstream_port)
        self.rng = random.Random(seed)
        self.mode, self.delay = "pass", 0.0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._conns: set[_Conn] = set()
        self._closed = False
        self.listener = socket.create_server((host, port))
        self.host, self.port = self.listener.getsockname()[:2]
        self.connections = 0
        threading.Thread(target=self._accept, daemon=True, name=f"proxy-{self.port}").start()

    def url_for(self, url: str) -> str:
        """`url` (redis://... or http://...) with its host and port replaced by this proxy's."""
        from urllib.parse import urlsplit, urlunsplit

        u = urlsplit(url)
        auth = u.netloc.rpartition("@")[0]
        return urlunsplit(u._replace(netloc=f"{auth + '@' if auth else ''}{self.host}:{self.port}"))

    # ---- faults ------------------------------------------------------------------------------------
    def freeze(self) -> None:
        self._set("freeze")

    def slow(self, delay: float) -> None:
        self._set("slow", delay)

    def cut(self) -> int:
        """Reset half of the live connections (and, until heal, each new one with odds of one half); returns
        how many were reset."""
        self._set("cut")
        with self._lock:
            victims = [c for c in sorted(self._conns, key=lambda c: c.serial) if self.rng.random() < 0.5]
        for conn in victims:
            conn.reset()
        return len(victims)

    def heal(self) -> None:
        self._set("pass")

    def _set(self, mode: str, delay: float = 0.0) -> None:
        with self._changed:
            self.mode, self.delay = mode, delay
            self._changed.notify_all()

    def wait_while_frozen(self, conn: "_Conn") -> bool:
        """Block while the proxy is frozen; False when the connection or the proxy closed meanwhile."""
        with self._changed:
            while self.mode == "freeze" and not conn.closed and not self._closed:
                self._changed.wait(0.2)
        return not conn.closed and not self._closed

    # ---- plumbing ----------------------------------------------------------------------------------
    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                self.connections += 1
                conn = _Conn(self, client, self.connections)
                dropped = self.mode == "cut" and self.rng.random() < 0.5
                if not dropped:
                    self._conns.add(conn)
            if dropped:
                conn.reset()
                continue
            threading.Thread(target=conn.run, daemon=True, name=f"proxy-conn-{conn.serial}").start()

    def forget(self, conn: "_Conn") -> None:
        with self._lock:
            self._conns.discard(conn)

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            conns = list(self._conns)
        self.listener.close()
        for conn in conns:
            conn.close()


class _Conn:
    def __init__(self, proxy: Proxy, client: socket.socket, serial: int):
        self.proxy, self.client, self.serial = proxy, client, serial
        self.upstream: socket.socket | None = None
        self.closed = False

    def run(self) -> None:
        # A connection made while frozen is accepted and never answered, upstream not even dialled until it ends.
        if not self.proxy.wait_while_frozen(self):
            return self.close()
        try:
            self.upstream = socket.create_connection(self.proxy.upstream, timeout=10)
            self.upstream.settimeout(None)
            if self.closed:  # reset (cut) or closed while it dialled
                return self.close()
        except OSError:
            return self.reset()
        threading.Thread(target=self._pump, args=(self.upstream, self.client), daemon=True).start()
        self._pump(self.client, self.upstream)

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while self.proxy.wait_while_frozen(self):
                if not select.select([src], [], [], 0.2)[0]:  # to see a freeze begin while waiting for bytes
                    continue
                data = src.recv(65536)
                if not data:
                    break
                if self.proxy.mode == "slow":
                    time.sleep(self.proxy.delay)
                if not self.proxy.wait_while_frozen(self):  # bytes read just before a freeze wait for its end
                    break
                dst.sendall(data)
        except OSError:
            pass
        self.close()

    def reset(self) -> None:
        """Close both sides with a TCP reset (SO_LINGER 0), as a dropped flow looks to its ends."""
        for sock in (self.client, self.upstream):
            if sock is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                except OSError:
                    pass
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.proxy.forget(self)
        for sock in (self.client, self.upstream):
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
