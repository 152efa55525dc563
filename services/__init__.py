"""Stoker's services: one package per service, plus ``common`` (broker factory, settings, telemetry)."""
