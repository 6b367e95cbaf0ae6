"""Hugging Face conversion in both directions.

    kinoe_jax.hf.convert_to_hf(checkpoint_dir, output_dir, ...)   # tools/convert_to_hf.py
    kinoe_jax.hf.convert_from_hf(hf_dir, output_dir, ...)         # tools/convert_from_hf.py

The name/shape mapping both use is the table `kinoe_jax.hf.mapping.RULES`.
"""

from kinoe_jax.hf.mapping import RULES, ConversionError, entries, param_shapes


# The conversions load JAX; they are imported when called because the conversion tools import
# kinoe_jax.hf.mapping (and so this package) before they check their inputs.
def convert_to_hf(*args, **kwargs):
    from kinoe_jax.hf.export import convert_to_hf as impl  # noqa: PLC0415

    return impl(*args, **kwargs)


def convert_from_hf(*args, **kwargs):
    from kinoe_jax.hf.importer import convert_from_hf as impl  # noqa: PLC0415

    return impl(*args, **kwargs)


__all__ = ["RULES", "ConversionError", "convert_from_hf", "convert_to_hf", "entries", "param_shapes"]
