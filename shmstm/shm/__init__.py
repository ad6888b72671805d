"""The shared-memory backend: segments on the machine (segments) and a runtime's
segment attached in this process (runtime)."""
