"""gin files in, the operative config out; errors name the file or binding at fault."""

from __future__ import annotations

import os

import gin
import jax

from kinoe_jax.config.paths import REPO_ROOT
from kinoe_jax.utils import atomic
from kinoe_jax.utils.errors import ConfigError


def load_gin(files: list[str], bindings: list[str] | tuple = ()) -> None:
    """Parse gin files and bindings before anything expensive happens."""
    for path in (os.getcwd(), REPO_ROOT):
        gin.add_config_file_search_path(path)
    for f in files:
        if not (os.path.exists(f) or os.path.exists(os.path.join(REPO_ROOT, f))):
            raise ConfigError(f"gin file not found: {f}")
    try:
        gin.parse_config_files_and_bindings(files, bindings, finalize_config=False)
    except (ValueError, IOError, SyntaxError) as e:
        # gin's messages say what is unknown; add which of the user's inputs it came from.
        raise ConfigError(f"bad gin configuration (files {files}, bindings {list(bindings)}): {e}") from e


def write_operative_config(workdir: str) -> None:
    if jax.process_index():
        return
    atomic.write_text(os.path.join(workdir, "config.gin"), gin.operative_config_str())
