"""The protocol-neutral core: domain types, the pipeline, bundles, features, ranker, profiles' model."""
