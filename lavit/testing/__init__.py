"""Test harnesses: fault injection for the reliability tests (``python -m lavit.testing``).

Nothing in the package imports this: production code paths have no test hooks.
"""
