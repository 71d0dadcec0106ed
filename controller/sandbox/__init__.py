"""Not the controller's core: the one-machine demo and the private Mosquitto that
it, `jetfleet broker run`, the tests and the benchmarks start."""
