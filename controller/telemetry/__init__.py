"""Fleet telemetry: MQTT ingestion, its SQLite store, plot data and the
Prometheus view."""
