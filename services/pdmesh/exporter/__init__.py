"""`pdmesh exporter`: the sidecar that turns cluster status and every worker's /metrics into
cluster-level series per role, for dashboards, alerts and autoscalers (`series.py` lists them)."""
