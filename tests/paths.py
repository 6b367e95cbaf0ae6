"""Where the repository and the tests lie, for tests that read its files or start its commands."""

import os

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
