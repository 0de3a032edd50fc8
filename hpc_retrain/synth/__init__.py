"""Synthetic plates of rod-shaped bacteria with exact instance masks, and the parameters that shape them."""
