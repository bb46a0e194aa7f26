"""CLI commands for telemetry: collect, report, health (registered on dispatch.cli.app)."""
