"""Rollouts: planning waves, driving them with signed commands, policies and
SLO bakes, and the store that makes them resumable (docs/operations.md, Rollouts)."""
