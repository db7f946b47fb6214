"""Training loops: one shared skeleton (training/common.py) and one module per kind (vqgan, ar, gan).

Layer: above models/ and pipeline/ (plumbing), below stages/. A stage module keeps its params, check and run;
the loop it runs lives here.
"""
