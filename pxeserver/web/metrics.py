"""HTTP's share of the metrics: every request the app answers is counted, and the exposition.

Counting runs in Flask's request hooks, so the API, autoinstall, iPXE and /boot/ handlers stay
as they are. The exposition (``[metrics] path``, ``/metrics`` by default) answers only the
networks in ``[metrics] allow``: the HTTP port also faces the guests, and although the metrics
carry counts only (no MAC, name or address), how many hosts are installing is the operator's
business. Anyone else gets 403.
"""

from __future__ import annotations

import ipaddress
import time

from flask import Flask, Response, g, request
from prometheus_client.exposition import choose_encoder

from pxeserver.app import Context
from pxeserver.metrics import http_path

TEXT = "text/plain; charset=utf-8"


def install(app: Flask, context: Context) -> None:
    """Count the app's requests and, when ``[metrics] enabled``, serve the exposition."""
    section = context.config.metrics
    http = context.metrics.protocol("http")
    duration = context.metrics.http_duration

    def kind() -> str:
        return "metrics" if request.path == section.path else http_path(request.path)

    @app.before_request
    def _count_request() -> None:
        g.metrics_started = time.monotonic()
        http.request(kind())

    @app.after_request
    def _count_reply(response: Response) -> Response:
        http.reply(f"{response.status_code // 100}xx")
        if response.status_code >= 500:
            http.error()
        if request.method != "HEAD" and response.content_length:
            http.sent(response.content_length)
        started = g.get("metrics_started")
        if started is not None:
            duration.labels(kind()).observe(time.monotonic() - started)
        return response

    if not section.enabled:
        return
    allowed = [ipaddress.ip_network(network) for network in section.allow]

    def exposition() -> Response:
        try:
            client = ipaddress.ip_address(request.remote_addr or "")
        except ValueError:
            client = None
        if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped:
            client = client.ipv4_mapped
        if client is None or not any(client in network for network in allowed):
            return Response("metrics are not served to this address ([metrics] allow)\n", 403,
                            content_type=TEXT)
        # Text format 0.0.4, or OpenMetrics when the scraper asks for it (Prometheus does).
        encode, content_type = choose_encoder(request.headers.get("Accept", ""))
        return Response(encode(context.metrics.registry), content_type=content_type)

    app.add_url_rule(section.path, "metrics", exposition, methods=["GET"])
