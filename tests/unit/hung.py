"""A stand-in for a hung daemon: a unix socket that accepts every connection and never answers."""

from __future__ import annotations

import socket
import threading
from pathlib import Path


class HungServer:
    """Accepts on a unix socket and never sends a byte; every connection stays open until close()."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(64)
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, name="hung daemon", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            self.accepted.append(conn)

    def close(self) -> None:
        """Stop accepting and drop every connection (a call still blocked on one then fails and returns)."""
        self.sock.close()
        for c in self.accepted:
            c.close()
