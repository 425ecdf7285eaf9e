"""Reading a service's Prometheus /metrics in tests."""

from __future__ import annotations

import urllib.request


def metric(address: str, name: str, **labels: str) -> float:
    """Sum of the samples of `name` at http://address/metrics whose labels include `labels`."""
    body = urllib.request.urlopen(f"http://{address}/metrics", timeout=10).read().decode()
    total = 0.0
    for line in body.splitlines():
        if not line.startswith(name) or line.startswith("#"):
            continue
        sample, value = line.rsplit(" ", 1)
        metric_name, _, label_text = sample.partition("{")
        if metric_name != name:
            continue
        if all(f'{k}="{v}"' in label_text for k, v in labels.items()):
            total += float(value)
    return total
