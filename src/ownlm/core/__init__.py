"""The ground floor: what every layer may use and nothing here imports from above.

`errors` (the one user-facing error), `config` (the base of every config class), `artifacts`
(atomic stage directories, manifests, content hashes), `progress` (rich bars, metric callbacks),
`plots` (PNG curves) and `perf` (machine facts: the measured matmul peak behind MFU).
"""
