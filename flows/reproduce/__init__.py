"""`python -m flows.reproduce models:/NAME/VERSION` (and the `reproduce-version`
deployment): rebuild a registered version from its tags and compare it with the original.

runner.py runs it (the flow and the command line), checkout.py restores the version's
commit and data in a temporary checkout, rules.py says what a reproduction compares and
when it counts as one.
"""
