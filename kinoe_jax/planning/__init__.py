"""Planning before renting: the ahead-of-time fit check (fit.py), read from the compiled HLO
(hlo_stats.py) plus the cost of the kernels the HLO cannot see (kernel_costs.py)."""
