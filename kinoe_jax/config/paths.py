"""Where the repository's own files are (gin_configs/, the built-in data), wherever the command runs."""

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
