"""Offline training for hyperrec: synthetic data, models, ONNX export and bundle publishing.

- `training.synthetic`: reproducible interaction logs with planted structure.
- `training.model`: embedding tables and the context-aware `Ranker`.
- `training.export`: ONNX export of the ranker and the parity check that gates publishing.
- `training.train`: the training loop, cold-start lists, profiles and `train_and_publish`.
"""
