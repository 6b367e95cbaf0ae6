"""The hardware: what is attached (runtime.setup, called first by every entry point) and the table
of chips and slices that the fit check compiles for (chips)."""
