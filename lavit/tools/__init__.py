"""Command-line tools over the layers below: bench, analyze, sweep, report (``lavit <tool>``)."""
