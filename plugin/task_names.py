"""Names of the worker's tasks: the node sends them by name and never imports the worker."""

ANALYSE_STUDY = "pacsclip.analyse_study"
DISPATCH_RESULT = "pacsclip.dispatch_result"
