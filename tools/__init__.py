"""Command-line tools, each run as `python tools/NAME.py`. A package as well, so that tests import
the code they check instead of loading a script by its path."""
