"""One BiSSL alternation's implicit solves at a trained backbone: contenders against the truth.

Within a BiSSL alternation the lower parameters and the Hessian batch are fixed, so every upper
step solves :math:`(I + H/(\\lambda+\\delta))\\,x = v_k` with the same operator and a new
right-hand side ``v_k`` (which depends on the upper step before it: no batching across ``k``).
This package builds that workload on real images (scikit-learn's digits, resized to 32x32) at a
backbone trained briefly with SimCLR, runs a hand-written reference (the BiSSL code's method,
independent of hypergrad) and hypergrad's contenders side by side, and writes raw JSON and a
report (``docs/benchmarks.md``).

Run ``python -m benchmarks.alternation --help``.
"""
