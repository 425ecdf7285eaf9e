"""`pdmesh exporter`: poll the cluster every --scrape-interval and serve the series until SIGTERM."""

from __future__ import annotations

import signal
import threading
import time

from pdmesh.exporter.cluster_poller import ClusterPoller
from pdmesh.exporter.exporter_config import ExporterConfig
from pdmesh.exporter.http_endpoint import serve_http


def run_exporter(config: ExporterConfig) -> int:
    poller = ClusterPoller(config)
    server = serve_http(config.host, config.port, poller)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    print(f"pdmesh exporter reading {config.scheduler_address} every {config.scrape_interval_s:g}s; "
          f"serving http://{config.host}:{server.server_port}/metrics and /targets", flush=True)
    while not stop.is_set():
        start = time.monotonic()
        poller.poll()
        stop.wait(max(0.0, config.scrape_interval_s - (time.monotonic() - start)))
    server.shutdown()
    poller.close()
    return 0
