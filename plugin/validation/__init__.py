"""Does the model work at this site? Report labels, validation against them, the go-live gate.

Reports the site already writes are the reference: each is labeled per finding (present, absent,
uncertain or not mentioned), and the scores of every model that ran on the study, live or in
shadow, are measured against those labels per site and finding.
"""
