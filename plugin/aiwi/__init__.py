"""IHE AI Workflow for Imaging (AIW-I): pacsclip as a task performer of a Task Manager's
Unified Procedure Steps, over UPS-RS (DICOM PS3.18 section 11, PS3.4 Annex CC)."""
