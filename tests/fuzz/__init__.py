"""Fuzzing the receive path of a running ``pacsclip node`` (scripts; a short run is a test)."""
