"""Sphinx extension: the API reference of quotient_opt, generated from ``__all__``.

Every public name of the package and of each subpackage gets a page entry, so
a name added to an ``__all__`` is documented without touching ``docs/``:

* one page per subpackage (``docs/api/<name>.rst``, written at build time and
  not committed); on it, one section per private implementation module that
  defines public names, opened by that module's docstring (where the library
  keeps the mathematics) and followed by the names it defines;
* the top-level page lists every name of ``quotient_opt.__all__`` with a link
  to where it is documented;
* a ``missing-reference`` handler resolves the cross-references the
  docstrings write against re-exports (``:func:`~quotient_opt.rebalance```,
  ``:class:`Symmetry```, ``:func:`neb```) to the documented object.

:func:`public_names` is also what the tests and ``docs/check_html.py`` use to
decide which names must appear in the built HTML.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import os
import pkgutil
import re
from types import ModuleType
from typing import Any

PACKAGE = "quotient_opt"
#: Section order on each subpackage page (private modules); others follow alphabetically.
SECTION_ORDER = {
    "symmetry": ["_spec", "_infer", "_tracer._registry", "_canonical", "_program", "_paths"],
    "transforms": ["_projection", "_path_norm", "_rebalance", "_teleport", "_revive",
                   "_aliases", "_transport"],
    "training": ["_fit", "_population", "_shared_state"],
    "contrib": ["_kinks", "_breathe", "_levenberg_marquardt"],
    "landscape": ["_neb", "_hessian", "_smooth", "_pca", "_interpolate", "_quotient",
                  "_assignment"],
}
#: Subpackages documented, in page order, with their page titles.
SUBPACKAGES = {
    "symmetry": "Symmetry: spec, group action, canonical forms",
    "transforms": "Transformations (Optax)",
    "training": "Training loops",
    "landscape": "Loss-landscape tools",
    "models": "Example models and tasks",
    "nn": "Layers",
    "contrib": "Contributed tools (dense ReLU MLPs, small least squares)",
}


def public_names(module: ModuleType) -> list[str]:
    """``module.__all__``, or, where a module has none, the public names it defines."""
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [
        n
        for n, o in vars(module).items()
        if not n.startswith("_")
        and not isinstance(o, ModuleType)
        and getattr(o, "__module__", None) == module.__name__
    ]


def all_public() -> dict[str, list[str]]:
    """``{module name: its public names}`` for the package and every documented subpackage."""
    out = {PACKAGE: public_names(importlib.import_module(PACKAGE))}
    for sub in SUBPACKAGES:
        name = f"{PACKAGE}.{sub}"
        out[name] = public_names(importlib.import_module(name))
    return out


def documented_at() -> dict[int, str]:
    """``{id(object): the dotted name it is documented under}`` (subpackage names)."""
    table: dict[int, str] = {}
    for sub in SUBPACKAGES:
        mod = importlib.import_module(f"{PACKAGE}.{sub}")
        for n in public_names(mod):
            table.setdefault(id(getattr(mod, n)), f"{mod.__name__}.{n}")
    return table


# --------------------------------------------------------------------------- page writing


def _defining_module(pkg: ModuleType, name: str, obj: Any) -> str:
    """The module whose source defines ``obj`` (searched among ``pkg``'s private modules)."""
    mod = getattr(obj, "__module__", None)
    if isinstance(mod, str) and mod.startswith(pkg.__name__):
        return mod
    if hasattr(pkg, "__path__"):
        holders = [
            sub.__name__
            for info in pkgutil.iter_modules(pkg.__path__)
            if getattr(sub := importlib.import_module(f"{pkg.__name__}.{info.name}"), name, None)
            is obj
        ]
        # data re-exported by several modules: the one that documents it (``#:``)
        documented = [m for m in holders if _attr_comment(m, name)]
        if documented or holders:
            return (documented or holders)[0]
    return pkg.__name__


def _fields(obj: type) -> set[str]:
    if hasattr(obj, "_fields"):
        return set(obj._fields)
    if dataclasses.is_dataclass(obj):
        return {f.name for f in dataclasses.fields(obj)}
    return set()


def _attr_comment(module: str, name: str) -> list[str]:
    """The ``#:`` comment lines right above ``name = ...`` in ``module``'s source."""
    source = inspect.getsource(importlib.import_module(module)).splitlines()
    for i, line in enumerate(source):
        if re.match(rf"{re.escape(name)}\s*(:[^=]*)?=", line):
            doc: list[str] = []
            j = i - 1
            while j >= 0 and source[j].lstrip().startswith("#:"):
                doc.insert(0, source[j].lstrip()[2:].strip())
                j -= 1
            return doc
    return []


def _directive(full: str, obj: Any, defmod: str) -> list[str]:
    """The autodoc directive for one public object."""
    if inspect.isclass(obj):
        fields = _fields(obj)
        members = [
            k
            for k, v in vars(obj).items()
            if not k.startswith("_") and k not in fields
            and (callable(v) or isinstance(v, (property, staticmethod, classmethod)))
        ]
        lines = [f".. autoclass:: {full}"]
        if members:
            lines.append(f"   :members: {', '.join(members)}")
        return lines
    if callable(obj):  # functions, jitted functions
        return [f".. autofunction:: {full}"]
    # data: the ``#:`` comment above its assignment in the defining module's source
    doc = _attr_comment(defmod, full.rsplit(".", 1)[1]) or ["(no description)"]
    module, short = full.rsplit(".", 1)
    lines = [f".. py:data:: {short}", f"   :module: {module}"]
    value = repr(dict(obj)) if hasattr(obj, "items") else repr(obj)
    if len(value) < 200:
        lines.append(f"   :value: {value}")
    lines.append("")
    lines += [f"   {d}" if d else "" for d in doc]
    return lines


def _title(text: str, char: str) -> list[str]:
    return [text, char * len(text), ""]


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().splitlines()[0].rstrip(".") if doc else ""


def subpackage_page(sub: str) -> str:
    pkg = importlib.import_module(f"{PACKAGE}.{sub}")
    names = public_names(pkg)
    where = documented_at()
    lines = _title(f"``{pkg.__name__}``", "=")
    lines += [f".. automodule:: {pkg.__name__}", ""]
    # group by defining module, in order of first appearance in __all__ (sorted for stability)
    groups: dict[str, list[str]] = {}
    for n in sorted(names, key=str.lower):
        defmod = _defining_module(pkg, n, getattr(pkg, n))
        groups.setdefault(defmod, []).append(n)
    order = [f"{pkg.__name__}.{m}" for m in SECTION_ORDER.get(sub, [])]
    rank = {m: i for i, m in enumerate(order)}
    for defmod, members in sorted(groups.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])):
        if defmod != pkg.__name__:
            mod = importlib.import_module(defmod)
            lines += _title(_first_line(mod.__doc__) or defmod, "-")
            # the module docstring (its mathematics), then the names it defines
            lines += [f".. automodule:: {defmod}", "   :no-index:", ""]
        else:
            lines += _title("Contents", "-") if len(groups) > 1 else []
        lines += [f".. py:currentmodule:: {pkg.__name__}", ""]
        for n in members:
            full, obj = f"{pkg.__name__}.{n}", getattr(pkg, n)
            directive = _directive(full, obj, defmod)
            if where.get(id(obj), full) != full:  # also public in an earlier subpackage
                directive.insert(1, "   :no-index:")
            lines += directive + [""]
    return "\n".join(lines) + "\n"


def top_page() -> str:
    pkg = importlib.import_module(PACKAGE)
    where = documented_at()
    lines = _title("API reference", "=")
    lines += [
        f".. automodule:: {PACKAGE}",
        "",
        "Every name below is importable from ``quotient_opt`` (``import quotient_opt as qo``)",
        "and documented in its subpackage:",
        "",
        ".. toctree::",
        "   :maxdepth: 1",
        "",
    ]
    lines += [f"   {sub}" for sub in SUBPACKAGES] + [""]
    lines += [".. list-table::", "   :header-rows: 1", "", "   * - ``qo.`` name", "     - documented at"]
    for n in sorted(public_names(pkg), key=str.lower):
        obj = getattr(pkg, n)
        if isinstance(obj, ModuleType):
            target = f":mod:`{obj.__name__}`"
        else:
            full = where.get(id(obj))
            if full is None:
                raise RuntimeError(f"quotient_opt.{n} is in no documented subpackage's __all__")
            role = "class" if inspect.isclass(obj) else "func" if callable(obj) else "data"
            target = f":py:{role}:`{full}`"
        lines += [f"   * - ``quotient_opt.{n}``", f"     - {target}"]
    return "\n".join(lines) + "\n"


def _write_if_changed(path: str, text: str) -> None:
    """Writes ``text`` unless the file holds it already (keeps Sphinx's incremental build)."""
    old = None
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            old = f.read()
    if old != text:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)


def write_pages(outdir: str) -> list[str]:
    """Writes the API pages into ``outdir``; returns the files written."""
    os.makedirs(outdir, exist_ok=True)
    pages = {"index.rst": top_page()}
    for sub in SUBPACKAGES:
        pages[f"{sub}.rst"] = subpackage_page(sub)
    written = []
    for fname, text in pages.items():
        path = os.path.join(outdir, fname)
        _write_if_changed(path, text)
        written.append(path)
    return written


# --------------------------------------------------------------------------- result figures

#: ``{generated include (relative to docs/): glob patterns (relative to the repository root)}``.
FIGURE_LISTS = {
    "guides/_sawtooth_figures.md": [
        "results/sawtooth*.png", "results/sawtooth/**/*.png",
        "results/landscape*.png", "results/landscape/**/*.png",
    ],
}


def figure_list(root: str, patterns: list[str], page_dir: str) -> str:
    """MyST figures for every PNG matching ``patterns``, captioned by a sibling ``.md`` file."""
    import glob

    found: list[str] = []
    for pat in patterns:
        for path in sorted(glob.glob(os.path.join(root, pat), recursive=True)):
            if path not in found:
                found.append(path)
    if not found:
        return (
            "No sawtooth or landscape figures have been written to `results/` yet. "
            "The runnable sections above are what exists now.\n"
        )
    out = []
    for path in found:
        rel = os.path.relpath(path, page_dir).replace(os.sep, "/")
        stem = os.path.splitext(os.path.basename(path))[0]
        title = stem.replace("_", " ").replace("-", " ").strip()
        caption_file = os.path.splitext(path)[0] + ".md"
        if os.path.exists(caption_file):
            with open(caption_file, encoding="utf-8") as f:
                caption = f.read().strip()
        else:
            caption = f"`{os.path.relpath(path, root)}`"
        out += [f"```{{figure}} {rel}", f":alt: {title}", ":width: 100%", "", caption, "```", ""]
    return "\n".join(out)


def write_figure_lists(srcdir: str) -> None:
    root = os.path.dirname(os.path.abspath(srcdir))
    for target, patterns in FIGURE_LISTS.items():
        path = os.path.join(srcdir, target)
        _write_if_changed(path, figure_list(root, patterns, os.path.dirname(path)))


# --------------------------------------------------------------------------- sphinx hooks


def _resolve(app, env, node, contnode):
    """Resolves ``quotient_opt.rebalance`` / ``Symmetry`` / ``neb`` to the documented object."""
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    modname = node.get("py:module") or ""
    candidates = [target]
    parts = modname.split(".")
    while parts:  # relative to the current module and its parents
        candidates.append(".".join(parts) + "." + target)
        parts.pop()
    where = app.env._qo_where  # type: ignore[attr-defined]
    domain = env.get_domain("py")
    for cand in candidates:
        obj = _lookup(cand)
        if obj is None:
            continue
        full = where.get(id(obj))
        if full is None and isinstance(obj, ModuleType) and obj.__name__ in domain.modules:
            full = obj.__name__
        if full is None:
            continue
        for typ in ("obj", "mod"):
            ref = domain.resolve_xref(
                env, node.get("refdoc"), app.builder, typ, full, node, contnode
            )
            if ref is not None:
                return ref
    return None


def _lookup(dotted: str) -> Any:
    parts = dotted.split(".")
    if parts[0] != PACKAGE:
        return None
    for i in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for p in parts[i:]:
            obj = getattr(obj, p, None)
            if obj is None:
                return None
        return obj
    return None


_ARRAYLIKE = re.compile(
    r"~?(?:[\w.]+\.)?Array \| ~?(?:numpy\.)?ndarray \| ~?(?:numpy\.)?bool \| "
    r"~?(?:numpy\.)?number \| bool \| int \| float \| complex"
)
_JAX_ARRAY = re.compile(r"~?jax\.jaxlib\._jax\.Array\b")
_PRIVATE = re.compile(r"~?(quotient_opt(?:\.\w+)*?\._\w+)\.(\w+)")


def clean_signature(sig: str | None, where: dict[int, str]) -> str | None:
    """Readable annotations: ``jax.typing.ArrayLike`` instead of its expansion, public paths."""
    if not sig:
        return sig
    sig = _ARRAYLIKE.sub("~jax.typing.ArrayLike", sig)
    sig = _JAX_ARRAY.sub("~jax.Array", sig)

    def public(m: re.Match) -> str:
        try:
            obj = getattr(importlib.import_module(m.group(1)), m.group(2))
        except (ImportError, AttributeError):
            return m.group(0)
        full = where.get(id(obj))
        return f"~{full}" if full else m.group(0)

    return _PRIVATE.sub(public, sig)


def _process_signature(app, what, name, obj, options, signature, return_annotation):
    where = app.env._qo_where  # type: ignore[attr-defined]
    return clean_signature(signature, where), clean_signature(return_annotation, where)


def _process_docstring(app, what, name, obj, options, lines):
    """A private module's summary line is its section title already: drop it from the body."""
    if what == "module" and "._" in name and lines:
        end = lines.index("") if "" in lines else len(lines)
        del lines[: end + 1]


def _builder_inited(app) -> None:
    write_pages(os.path.join(app.srcdir, "api"))
    write_figure_lists(str(app.srcdir))
    app.env._qo_where = documented_at()  # type: ignore[attr-defined]
    # methods are documented under their classes
    for full in list(app.env._qo_where.values()):
        obj = _lookup(full)
        if inspect.isclass(obj):
            for k, v in vars(obj).items():
                if not k.startswith("_") and callable(v):
                    app.env._qo_where.setdefault(id(v), f"{full}.{k}")


def setup(app):
    app.connect("builder-inited", _builder_inited)
    app.connect("missing-reference", _resolve)
    app.connect("autodoc-process-signature", _process_signature)
    app.connect("autodoc-process-docstring", _process_docstring)
    return {"version": "1", "parallel_read_safe": True, "parallel_write_safe": True}
