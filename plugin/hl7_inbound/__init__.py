"""Radiology reports received as HL7 v2 ORU^R01 over MLLP (``pacsclip hl7-listen``).

- ``parse``: an ORU^R01's bytes to the report it carries (study keys and text); pure.
- ``ack``: the original-mode ACK (MSA, and ERR when the message is not accepted); pure.
- ``inbox``: every message received, kept durably before anything else is done with it.
- ``framing``: MLLP blocks off the stream; a message over the limit streamed to the inbox.
- ``listener``: the asyncio MLLP server that ties them to the report intake.
"""
