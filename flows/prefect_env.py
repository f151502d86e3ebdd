"""The environment every Prefect process of distillery starts with (the CLI, the stack)."""

# Ephemeral Prefect (no server configured) starts its own API; on 2 busy cores that can take
# longer than Prefect's 20 s default, and telemetry cannot reach its host offline.
PREFECT_DEFAULTS = {
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "distillery",
    # The engine's drain after Ctrl-C logs once the flow run is gone: not a reason to warn.
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
}
