"""Release reports: training compute against the EU AI Act thresholds, the training-data summary from the
blend manifests, and loss/MFU curves from the TensorBoard logs.

Modules: ``compute``, ``data``, ``curves``, ``cli``. Kept import-free here so that ``engmoe --help`` does
not load torch.
"""
