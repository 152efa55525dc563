"""What every service shares: settings, the broker factory, telemetry, artifacts, views."""
