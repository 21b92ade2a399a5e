"""The application layer: configuration, assembly of components, process lifecycle, CLI and demo."""
