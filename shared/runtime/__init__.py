"""What the two commands share that is not the wire protocol: command-line and settings
plumbing (cli, config), the process runner (uvloop, signals, malloc tuning), descriptor limits,
metrics helpers, log-text escaping, reconnect backoff and the software version."""
