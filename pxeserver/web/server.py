"""The HTTP service: the Flask app served in-process by waitress, with boot files via sendfile.

Why waitress: it is pure Python (no compiler on the boot server), already a dependency, runs
inside ``pxeserver serve`` next to the UDP services without forking (gunicorn is a process
manager, its workers would each need their own registry connection and signal handling),
keeps slow clients off the worker threads (one event loop does all socket I/O and a fixed
thread pool runs the app, so 100 installers pulling initrds do not need 100 threads), and
refuses oversized bodies and headers before the app sees them. cheroot has a thread per
connection, which a PXE storm turns into hundreds of threads.

What is hand-written: waitress 3 copies ``wsgi.file_wrapper`` bodies through Python in
SO_SNDBUF-sized pieces (16 KB on Linux loopback): read, send, seek, per piece. Measured with
100 parallel 40 MB downloads that costs about three times the CPU of the whole transfer with
``os.sendfile``, and on a two-core server that CPU is what the clients wait for. So
:class:`SendfileChannel` sends file bodies with ``os.sendfile`` and leaves everything else
(headers, JSON, rendered kickstarts) to waitress. It overrides waitress's ``_flush_some``,
an internal method: the loop is kept the same as waitress 3.0's so the rest of the channel
(locking, high-watermark flow control, close handling) still holds.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from waitress import wasyncore
from waitress.buffers import ReadOnlyFileBasedBuffer
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer

from pxeserver.app import Context
from pxeserver.web import MAX_BODY_BYTES, create_app

log = logging.getLogger(__name__)

# Largest piece handed to one send()/sendfile(): big enough that a fast loopback or LAN client
# costs few Python iterations, small enough that one client cannot hog the event loop.
MAX_SEND = 1 << 20


def _sendfile_source(buffer: object) -> int | None:
    """The file descriptor behind a wsgi.file_wrapper body, if the kernel can send from it."""
    if not isinstance(buffer, ReadOnlyFileBasedBuffer):
        return None
    try:
        return buffer.file.fileno()
    except (AttributeError, OSError, ValueError):  # BytesIO and friends: no descriptor
        return None


class SendfileChannel(HTTPChannel):
    """A waitress channel that sends ``wsgi.file_wrapper`` bodies with ``os.sendfile``."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.sendbuf_len = max(self.sendbuf_len, MAX_SEND)

    def _flush_some(self, do_close: bool = True) -> bool:
        sent = 0
        while True:
            outbuf = self.outbufs[0]
            remaining = outbuf.__len__()  # as waitress: len() overflows on 32-bit builds
            source = _sendfile_source(outbuf)
            while remaining > 0:
                if source is None:
                    num_sent = self.send(outbuf.get(self.sendbuf_len), do_close=do_close)
                    if num_sent:
                        outbuf.skip(num_sent, True)
                else:
                    num_sent = self._sendfile(outbuf, source, min(remaining, MAX_SEND), do_close)
                if not num_sent:
                    return self._sent(sent)
                remaining -= num_sent
                sent += num_sent
                self.total_outbufs_len -= num_sent
            if len(self.outbufs) == 1:
                return self._sent(sent)  # outbufs[-1] is the writable one: keep it
            finished = self.outbufs.pop(0)
            try:
                finished.close()
            except Exception:
                log.exception("could not close a sent response body")

    def _sendfile(self, outbuf: ReadOnlyFileBasedBuffer, source: int, count: int,
                  do_close: bool) -> int:
        """Send from the file's current position; 0 when the socket is full or gone."""
        position = outbuf.file.tell()
        try:
            num_sent = os.sendfile(self.socket.fileno(), source, position, count)
        except BlockingIOError:
            return 0
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            # The client went away: as waitress's send() does. Other errors propagate to
            # waitress, which logs them and closes this channel.
            if do_close:
                self.handle_close()
            return 0
        outbuf.file.seek(position + num_sent)
        outbuf.remain -= num_sent
        return num_sent

    def _sent(self, sent: int) -> bool:
        if sent:
            self.last_activity = time.time()
        return bool(sent)


class _Server(TcpWSGIServer):
    channel_class = SendfileChannel


class HttpService:
    """``pxeserver serve``'s HTTP side: the JSON API, autoinstall files, iPXE, /boot/."""

    name = "http"

    def __init__(self, context: Context) -> None:
        self.context = context
        self.port: int | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        section = self.context.config.http
        try:
            self._server = _Server(
                create_app(self.context),
                host=section.address,
                port=section.port,
                threads=section.threads,
                ident="pxeserver",
                # A PXE storm: every domU of a dom0 at once, each holding a connection for its
                # initrd; waitress's default of 100 would queue the rest in the backlog.
                connection_limit=1000,
                # poll(), not select(): select cannot watch descriptors above 1024.
                asyncore_use_poll=True,
                # Refused before the app reads it, with 413; the app enforces the same limit.
                max_request_body_size=MAX_BODY_BYTES,
                channel_timeout=60,
            )
        except OSError as exc:
            raise OSError(
                exc.errno, f"http: cannot listen on {section.address}:{section.port}: {exc.strerror}"
            ) from None
        self.port = int(self._server.effective_port)  # waitress reports it as a string
        # Port 0 means "any free port": boot configs and callback URLs must carry the real one.
        section.port = self.port
        self._thread = threading.Thread(
            target=self.context.supervisor.guard(self._server.run, self.name), name="http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        # Close every socket from inside the event loop (the loop owns them); with its socket
        # map empty, waitress's loop returns.
        server.trigger.pull_trigger(lambda: wasyncore.close_all(server._map))
        thread.join(timeout=5)
        server.task_dispatcher.shutdown(cancel_pending=True, timeout=5)
        self._server = self._thread = None

    def endpoints(self) -> list[str]:
        section = self.context.config.http
        return [f"http://{section.address}:{self.port if self.port is not None else section.port}"]
