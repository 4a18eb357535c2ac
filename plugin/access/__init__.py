"""Who may do what: people signed in through the hospital's OpenID Connect provider and
named machine tokens, each with roles; the table of which role each route needs; and the
access log that answers "who saw this patient".
"""
