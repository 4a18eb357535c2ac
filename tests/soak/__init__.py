"""The soak: a multi-process deployment under load and kill -9 chaos (a script; a short run is
a test)."""
