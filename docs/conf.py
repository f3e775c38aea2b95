"""Sphinx configuration: ``python -m sphinx -W -b html docs docs/_build/html``.

Needs Sphinx and pytest (``pip install -e '.[docs]'``): the theme is
alabaster, which ships with Sphinx, and autodoc imports the package without
any optional driver -- backends import redis, psycopg2 and boto3 only when
one is opened, and the mock list below covers a module that would not.
"""

from __future__ import annotations

import os
import sys

# Document the checkout this file lives in, installed or not.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import tiered_state

project = "tiered-state"
author = "tiered-state contributors"
copyright = "tiered-state contributors"
release = tiered_state.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.viewcode",
]

root_doc = "index"
exclude_patterns = ["_build"]
pygments_style = "sphinx"

# ---------------------------------------------------------------- autodoc
# The optional drivers are imported lazily, only when a backend is opened;
# mocking them as well means a docs build never depends on which extras are
# installed. (tiered_state.testing needs the real pytest: the docs extra has it.)
autodoc_mock_imports = ["redis", "psycopg2", "boto3", "botocore"]
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
# Show defaults as written (``default=_RAISE``), not as ``<object object at 0x...>``.
autodoc_preserve_defaults = True
autoclass_content = "class"

# ---------------------------------------------------------------- HTML
html_theme = "alabaster"
html_title = f"tiered-state {release}"
html_theme_options = {
    "description": "Application state across HOT, WARM and COLD storage tiers",
    "github_user": "tiered-state",
    "github_repo": "tiered-state",
    "github_button": False,
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "240px",
}
html_sidebars = {
    "**": ["about.html", "navigation.html", "relations.html", "searchbox.html"],
}
html_static_path: list[str] = []
