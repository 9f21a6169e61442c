"""A real S3 endpoint on 127.0.0.1 for the tests and `djc bench data`: moto's server mode, in this process.

Clients talk to it over HTTP exactly as to S3 (signed requests, ranged GETs, multipart uploads); nothing in
djc knows it is not AWS. moto keeps the objects in this process's memory, not in the HTTP server, so stop()
takes the endpoint down (clients see connection refused, then reset connections, as from a restarting
server) and start() on the same port brings it back with its buckets intact, as durable storage would.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

import fsspec

# Placeholder credentials: moto accepts any, but botocore will not sign without some.
LOOPBACK_ENV = {"AWS_ACCESS_KEY_ID": "loopback", "AWS_SECRET_ACCESS_KEY": "loopback", "AWS_DEFAULT_REGION": "us-east-1"}


class LoopbackS3:
    """start() / stop() / start() again on the same port. Built from moto's WSGI app and request handler
    rather than its ThreadedMotoServer, whose stop() leaves the listening socket open (clients then hang
    in its backlog instead of being refused) and keep-alive connections served: not a server that is down."""

    def __init__(self, port: int = 0):
        try:
            from moto.moto_server.werkzeug_app import (DomainDispatcherApplication, MotoRequestHandler,
                                                       create_backend_app)
            from werkzeug.serving import ThreadedWSGIServer
        except ImportError as e:
            raise ImportError("the loopback S3 server needs moto's server mode: pip install 'moto[server]' "
                              "(part of djc's [test] extra)") from e

        class Server(ThreadedWSGIServer):
            """Remembers its open connections, so that stop() can cut them."""

            def __init__(self, *args, **kwargs):
                self.connections: set[socket.socket] = set()
                self.lock = threading.Lock()
                super().__init__(*args, **kwargs)

            def process_request(self, request, client_address):
                with self.lock:
                    self.connections.add(request)
                super().process_request(request, client_address)

            def shutdown_request(self, request):
                with self.lock:
                    self.connections.discard(request)
                super().shutdown_request(request)

        self._make = lambda port: Server("127.0.0.1", port, DomainDispatcherApplication(create_backend_app),
                                         handler=MotoRequestHandler)
        self.port, self._server, self._thread = port, None, None
        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> LoopbackS3:
        self._server = self._make(self.port)
        self.port = self._server.server_address[1]  # port=0 picked a free one; a restart keeps it
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="loopback-s3", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Down like a crashed server: new connections refused, open ones reset. The objects stay."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.shutdown()
        server.server_close()
        with server.lock:
            for conn in server.connections:
                try:
                    conn.shutdown(socket.SHUT_RDWR)
                except OSError:  # already closed by its client
                    pass
        self._thread.join()

    def use(self, credentials: dict[str, str] | None = None) -> None:
        """Point this process (and processes it starts from now on) at the server through the standard AWS
        environment: AWS_ENDPOINT_URL and credentials (placeholders unless given)."""
        os.environ.pop("AWS_PROFILE", None)  # a user's profile must not override the loopback credentials
        os.environ.update({**LOOPBACK_ENV, **(credentials or {}), "AWS_ENDPOINT_URL": self.endpoint})

    def new_bucket(self, prefix: str = "djc") -> str:
        """A fresh, empty bucket; returns its s3:// URL."""
        name = f"{prefix}-{uuid.uuid4().hex[:12]}"
        fs = fsspec.filesystem("s3", endpoint_url=self.endpoint)
        fs.mkdir(name)
        return f"s3://{name}"
