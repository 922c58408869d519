"""The supervisors: `_supervisor` runs `--spawn`'s app workers, `_processes` forks
`--workers` balancer processes, and both follow `_workers`' pure state machine (when to
restart, the backoff, the crash-loop hold)."""
