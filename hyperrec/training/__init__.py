"""Offline training for hyperrec: synthetic data, models, ONNX export and bundle publishing.

- `synthetic`: reproducible interaction logs with planted structure.
- `networks`: embedding tables and the context-aware `Ranker`.
- `export`: ONNX export of the ranker and the parity check that gates publishing.
- `train`: the training loop, cold-start lists, profiles and `train_and_publish`.
- `interactions`: the in-memory interaction log (`Interactions`, `ItemCatalog`) shared by everything below.
- `loaders`: MovieLens, MovieTweetings and the generic events format.
- `splits`, `metrics`, `baselines`: leakage-free splits, full-catalogue ranking
  metrics and the baselines (popularity, item-kNN, implicit ALS).
- `history_model`: hybrid retrieval (ids + categories) with a fold-in user tower.
- `synth_bundle`: large untrained bundles for benchmarks.
"""
