"""Which hypergradient estimator, when? Implicit, unrolled and first-order, measured side by side.

Three problems, all data shipped with scikit-learn: a quadratic bilevel problem (distance of one
estimate to the closed-form hypergradient against its cost), per-pixel L2 selection on digits
and data hyper-cleaning on digits with 50 % corrupted labels (``examples/``; outer loss reached
against cost and time). Contenders: implicit differentiation (CG, Neumann), ITD (full,
truncated), F2SA, V-PBGD and random search as the floor. Cost is counted in gradient
evaluations with a Hessian product at its measured price in gradients, and in wall time.

Run ``python -m benchmarks.estimators run`` (full mode: 5 seeds, <= 15 minutes on 2 idle cores),
then ``python -m benchmarks.estimators report`` to rebuild ``docs/estimators.md``'s measured part.
"""
