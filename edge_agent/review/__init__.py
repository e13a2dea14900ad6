"""The clinician review app (`edge-agent review`): worklist, case page with heatmap, verdicts, quarantine, export.

Optional: needs the `[review]` extra (Flask). The screening install stays minimal; nothing in the agent's
screening path imports this package. See docs/review.md.
"""
