"""Local peers that notifications go to: an HTTP server (the webhook) and an SMTP server (aiosmtpd)."""

from __future__ import annotations

import email
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from peers import free_port

#: What the phantom of tests/dicom_factory.make_series is called: never in a notification.
PHI = ("Test^Phantom", "Phantom", "TEST0001")


class Webhook:
    """A local HTTP server that keeps every POSTed JSON body (and when it came, ``received_at``)."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.received_at: list[float] = []
        received, received_at = self.received, self.received_at

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append(json.loads(body))
                received_at.append(time.time())
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Mailbox:
    """A local SMTP server (aiosmtpd) that keeps every message."""

    def __init__(self) -> None:
        from aiosmtpd.controller import Controller

        self.messages: list[email.message.Message] = []
        messages = self.messages

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # noqa: N802
                message = email.message_from_bytes(envelope.content)
                message["X-Envelope-To"] = ", ".join(envelope.rcpt_tos)
                messages.append(message)
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()

    @staticmethod
    def body(message: email.message.Message) -> str:
        return "".join(part.get_payload(decode=True).decode() for part in message.walk()
                       if part.get_content_type() == "text/html")
