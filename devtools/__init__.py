"""The project's developer tools, beside the product: the real-parts harness (a mosquitto on a free
port, the daemon as a process, a probe client, the test models) that the tests, the benchmark and
the chaos run share, and those two tools themselves (scripts/bench, scripts/chaos run them)."""
