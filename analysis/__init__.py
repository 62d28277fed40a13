"""What the models do: sampling, quality metrics (FID, CLIP score), attention capture and the
window-similarity analysis, and their commands (analysis/cli.py)."""
