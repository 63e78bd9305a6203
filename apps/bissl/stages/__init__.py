"""Pipeline stages: each a function taking the validated config and the run directory."""
