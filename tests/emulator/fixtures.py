"""pytest fixtures that start the loopback emulators (filled in by the emulator modules)."""
