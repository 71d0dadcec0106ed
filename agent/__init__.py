"""jetfleet-agent: the daemon on each Jetson that verifies, builds, gates and activates models."""

__version__ = "0.1.0"
