"""The wheel carries the review app's templates and static files; Flask is only in the [review] extra; the
screening path never imports the review package."""
from __future__ import annotations

import ast
import re
from pathlib import Path

from test_packaging import metadata, norm, wheel_names, wheel_path  # noqa: F401  (module fixtures, reused)

ROOT = Path(__file__).resolve().parents[1]
REVIEW = ROOT / "edge_agent" / "review"


def test_wheel_ships_templates_and_static_files(wheel_names) -> None:  # noqa: F811
    for p in sorted(REVIEW.glob("templates/*.html")) + sorted(REVIEW.glob("static/*")):
        assert f"edge_agent/review/{p.parent.name}/{p.name}" in wheel_names, p.name


def test_flask_is_an_optional_extra(metadata) -> None:  # noqa: F811
    reqs = metadata.get_all("Requires-Dist") or []
    base = [r for r in reqs if "extra ==" not in r]
    assert not any(norm(re.split(r"[<>=;\s\[]", r)[0]) == "flask" for r in base)
    assert any(norm(re.split(r"[<>=;\s\[]", r)[0]) == "flask" and 'extra == "review"' in r for r in reqs)


def test_screening_modules_do_not_import_the_review_app() -> None:
    for path in (ROOT / "edge_agent").glob("*.py"):
        if path.name == "cli.py":
            continue  # the `review` command imports it lazily, inside the command
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n and ("review" in n.split(".") or n.startswith("flask")) for n in names), path.name
