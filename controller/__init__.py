"""The operator side of jetfleet: CLI, rollout engine, fleet registry, telemetry ingestion."""
