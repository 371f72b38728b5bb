"""What a run writes: the model card, metric plots, titled overlays, prediction JSON, the Hub upload."""
