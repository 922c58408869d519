"""The control plane: the admin API and the dashboard (with its page, style and script),
the event feed, the health checker, the structured logs, and discovery through the service
registry. Plain Python, never on a request's path."""
