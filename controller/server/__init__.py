"""`jetfleet serve`: bundle hosting over HTTP, the Prometheus endpoint, telemetry
ingestion, and the state file that tells commands where bundles are served."""
