"""Resolve cross-references in docstrings to the one tdfusion object they can mean.

The API pages document every object under the name users import it by (``tdfusion.nets.X``,
not ``tdfusion.nets.pretrained.X``), so a docstring that writes ``:func:`read_checkpoint``` or
``:class:`MetaFusionTrainer``` in its own module, or the full path of the defining module
(``tdfusion.inference.colour.merge_chroma``), looks for a name that has no entry. When the
Python domain cannot resolve such a reference, this handler looks for documented objects whose
full name ends with ``.<target>`` (for a full path: with its last part, and only entries that
are the very same object); exactly one match resolves it (the lazy top-level aliases such as
``tdfusion.LossGenerator`` give way to the sub-package's entry), none or several leave the
reference unresolved, and ``nitpicky`` reports it.
"""

from __future__ import annotations

import importlib
from typing import Any

from docutils import nodes
from sphinx.addnodes import pending_xref
from sphinx.application import Sphinx
from sphinx.environment import BuildEnvironment

#: Role name -> object types of the Python domain it may point to.
ROLE_TYPES = {
    "class": {"class", "exception"},
    "exc": {"exception", "class"},
    "func": {"function", "method", "classmethod", "staticmethod"},
    "meth": {"method", "classmethod", "staticmethod", "function"},
    "attr": {"attribute", "property", "data"},
    "data": {"data", "attribute"},
    "obj": None,
    "mod": {"module"},
}


def import_object(path: str) -> Any:
    """The object a dotted path names (``package.module.Class.attribute``), or ``None``."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        try:
            value: Any = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            value = getattr(value, attribute, None)
            if value is None:
                return None
        return value
    return None


def resolve_short_reference(
    app: Sphinx, env: BuildEnvironment, node: pending_xref, contnode: nodes.Element
) -> nodes.Element | None:
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "").lstrip(".~")
    role = node.get("reftype")
    if not target or role not in ROLE_TYPES:
        return None
    allowed = ROLE_TYPES[role]
    domain = env.get_domain("py")
    qualified = target.startswith("tdfusion.")
    # A qualified name is matched by its last part, then only by identity of the objects.
    suffix = "." + (target.rsplit(".", 1)[-1] if qualified else target)
    matches = {
        entry.node_id: name
        for name, entry in domain.objects.items()  # type: ignore[attr-defined]
        if name.startswith("tdfusion.")
        and name.endswith(suffix)
        and not entry.aliased
        and (allowed is None or entry.objtype in allowed)
    }
    if qualified:
        wanted = import_object(target)
        matches = {
            k: v for k, v in matches.items() if wanted is not None and import_object(v) is wanted
        }
    if len(matches) > 1:
        # The lazy top-level names (``tdfusion.LossGenerator``) repeat a sub-package's object.
        matches = {k: v for k, v in matches.items() if v != "tdfusion" + suffix}
    if len(matches) != 1:
        return None
    (full_name,) = matches.values()
    resolved = pending_xref("", refdomain="py", reftype=role, reftarget=full_name)
    resolved.attributes.update({k: v for k, v in node.attributes.items() if k.startswith("py:")})
    return domain.resolve_xref(
        env, node["refdoc"], app.builder, role, full_name, resolved, contnode
    )


def setup(app: Sphinx) -> dict[str, Any]:
    app.connect("missing-reference", resolve_short_reference)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
