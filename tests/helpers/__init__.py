"""Builders, constants and oracles shared by test modules (no test module imports another one); see the README's
"Tests" section for which module holds what."""
