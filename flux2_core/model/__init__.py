"""FLUX.2 transformer modules (``flux2_core.model.transformer.Flux2Transformer``)."""
