"""The exporter's HTTP face: /metrics (cluster series), /targets (Prometheus http_sd_configs:
every worker's metrics address, labelled by role and worker), /healthz."""

from __future__ import annotations

import json
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pdmesh.exporter.cluster_poller import ClusterPoller
from pdmesh.exporter.cluster_signals import Sample
from pdmesh.exporter.series import SERIES


class SampleCollector:
    """A prometheus_client collector that serves whatever `source` returns at scrape time."""

    def __init__(self, source: Callable[[], list[Sample]]):
        self.source = source

    def collect(self):
        by_name: dict[str, list[Sample]] = defaultdict(list)
        for sample in self.source():
            by_name[sample.name].append(sample)
        for name, samples in by_name.items():
            spec = SERIES[name]
            kind = CounterMetricFamily if spec.kind == "counter" else GaugeMetricFamily
            family = kind(name, spec.help, labels=spec.labels)
            for sample in samples:
                labels = dict(sample.labels)
                family.add_metric([labels[label] for label in spec.labels], sample.value)
            yield family


def serve_http(host: str, port: int, poller: ClusterPoller) -> ThreadingHTTPServer:
    """Start serving in a daemon thread; the returned server's `server_port` is the bound port."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SampleCollector(poller.samples))
    routes = {
        "/metrics": lambda: (CONTENT_TYPE_LATEST, generate_latest(registry)),
        "/targets": lambda: ("application/json", json.dumps(poller.targets()).encode()),
        "/healthz": lambda: ("text/plain", b"ok\n"),
    }

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            route = routes.get(self.path.split("?", 1)[0])
            if route is None:
                self.send_error(404)
                return
            content_type, body = route()
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # one line per scrape would drown the log
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="pdmesh-exporter-http", daemon=True).start()
    return server
