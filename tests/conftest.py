from hub_server import hub_server  # noqa: F401  (the `hub_server` fixture: a local Hub-compatible server)
