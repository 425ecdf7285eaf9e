"""Settings of `pdmesh exporter` (flags, `PDMESH_<FLAG>`, `--config`, like every service)."""

from __future__ import annotations

from dataclasses import dataclass, field

from pdmesh.config import Security
from pdmesh.errors import InvalidRequestError
from pdmesh.option import group, option

DEFAULT_PORT = 9450


@dataclass(frozen=True, slots=True)
class ExporterConfig:
    scheduler_address: str = field(default="127.0.0.1:50051", metadata=option(
        "host:port of the scheduler's client port (cluster status is read there)", flag="scheduler"))
    host: str = field(default="127.0.0.1", metadata=option("address to bind (0.0.0.0: every interface)"))
    port: int = field(default=DEFAULT_PORT, metadata=option(
        "HTTP port of /metrics (cluster series) and /targets (workers, Prometheus http_sd) (0: a free one)"))
    scrape_interval_s: float = field(default=5.0, metadata=option(
        "seconds between reads of cluster status and worker metrics", flag="scrape-interval"))
    window_s: float = field(default=60.0, metadata=option(
        "seconds of worker history behind rates and the hand-off p95", flag="window"))
    security: Security = field(default_factory=Security, metadata=group())  # cluster status as the mesh

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise InvalidRequestError(f"port must be in [0, 65535], got {self.port}", "port")
        if self.scrape_interval_s <= 0:
            raise InvalidRequestError(f"scrape-interval must be > 0, got {self.scrape_interval_s}", "scrape-interval")
        if self.window_s < self.scrape_interval_s:
            raise InvalidRequestError(f"window ({self.window_s}) must be at least scrape-interval "
                                      f"({self.scrape_interval_s})", "window")
