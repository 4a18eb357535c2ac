"""Delivery: sending result objects out (C-STORE, STOW-RS) and the lifecycle of dispatch jobs.

``dimse`` and ``stow`` send files to one destination and report each instance's status;
``destinations`` picks the sender a configured destination needs; ``jobs`` delivers one
dispatch job, decides between retrying and dead-lettering, and replays dead-lettered jobs.
"""
