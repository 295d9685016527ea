"""Renderers: turn a report into what people read (terminal, card, badge, heatmap, CI summary)."""
