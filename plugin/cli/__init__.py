"""The ``pacsclip`` command line."""
