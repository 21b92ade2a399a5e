"""Offline training for hyperrec: synthetic data, models, ONNX export and bundle publishing.

- `training.synthetic`: reproducible interaction logs with planted structure.
- `training.model`: embedding tables and the context-aware `Ranker`.
- `training.export`: ONNX export of the ranker and the parity check that gates publishing.
- `training.train`: the training loop, cold-start lists, profiles and `train_and_publish`.
- `training.interactions`: the in-memory interaction log (`Interactions`, `ItemCatalog`) shared by everything below.
- `training.loaders`: MovieLens, MovieTweetings and the generic events format.
- `training.splits`, `training.metrics`, `training.baselines`: leakage-free splits, full-catalogue ranking
  metrics and the baselines (popularity, item-kNN, implicit ALS).
- `training.history_model`: hybrid retrieval (ids + categories) with a fold-in user tower.
- `training.synth_bundle`: large untrained bundles for benchmarks.
"""
