"""The fleet's desired state: signed group releases and device pins, their
history, and drift from them (docs/operations.md, Releases)."""
