"""Jinja2 templates of the card section, badge, heatmap and CI summary, shipped with ftaudit."""
