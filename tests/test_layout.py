"""The repository's shape: the README's layout tree matches the folders, the README stays a
landing page, no file cites a document the repository does not hold, and imports form no circle."""

import ast
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "nativetok_jax"


def _readme() -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read()


def _layout_block() -> list[str]:
    text = _readme()
    start = text.index("<!-- layout: checked by tests/test_layout.py -->")
    block = text[start:].split("```")[1]
    return [line for line in block.splitlines() if line.strip()]


def test_the_readme_layout_tree_names_every_package_folder_and_module_and_nothing_else():
    named_folders, named_files = set(), set()
    parents: list[tuple[int, str]] = []  # (indent, folder) of the enclosing folders
    for line in _layout_block():
        indent, words = len(line) - len(line.lstrip()), line.split()
        while parents and parents[-1][0] >= indent:
            parents.pop()
        prefix = parents[-1][1] + "/" if parents else ""
        if words[0].endswith("/"):
            folder = prefix + words[0].rstrip("/")
            named_folders.add(folder)
            parents.append((indent, folder))
            words = words[1:]
        else:
            folder = prefix.rstrip("/")
        named_files.update(f"{folder}/{w}" for w in words if w.endswith(".py"))
    folders, modules = set(), set()
    for directory, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        relative = os.path.relpath(directory, ROOT)
        if "__init__.py" in files:
            folders.add(relative)
        if relative == PACKAGE or relative.startswith(f"{PACKAGE}/models"):  # the folders whose files are named
            modules.update(f"{relative}/{f}" for f in files if f.endswith(".py") and f != "__init__.py"
                           and not (relative.startswith(f"{PACKAGE}/models/") and relative.count("/") > 1))
    folders.discard(PACKAGE)
    assert folders <= named_folders, f"package folders missing from the README's layout: {folders - named_folders}"
    assert modules <= named_files, f"modules missing from the README's layout: {modules - named_files}"
    missing = [p for p in named_folders | named_files if not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, f"the README's layout names paths that do not exist: {missing}"


def test_the_readme_is_a_landing_page_naming_both_systems_first():
    text = _readme()
    assert len(text.splitlines()) <= 200
    first_paragraph = text.split("\n\n")[1]
    for name in ("NativeTok", "D²iT", "DiT"):
        assert name in first_paragraph
    for link in re.findall(r"\]\((docs/[^)]+)\)", text):
        assert os.path.exists(os.path.join(ROOT, link)), link


def test_no_tracked_file_cites_an_outside_document_or_a_machine_path():
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not files:  # not a git checkout (an sdist): nothing to check
        return
    # Spelt in pieces so that this file does not cite them itself.
    outside = re.compile("|".join([r"NATIVE" r"TOK\.md", r"D2" r"IT\.md", "/wo" "rk/", r"\.\./sha" r"red/"]))
    offenders = []
    for name in files:
        if name.endswith((".py", ".md", ".sh", ".toml", ".txt", ".ipynb", ".json")) and os.path.exists(os.path.join(ROOT, name)):
            with open(os.path.join(ROOT, name), encoding="utf-8", errors="replace") as f:
                if outside.search(f.read()):
                    offenders.append(name)
    assert not offenders, f"files citing documents the repository does not hold or machine paths: {offenders}"


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, function-level imports included (an AST pass)."""
    modules = {}
    for directory, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                modules[module.removesuffix(".__init__")] = path

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets.update(resolve(a.name) for a in node.names if a.name.startswith(PACKAGE))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = module.split(".")
                    if not path.endswith("__init__.py"):
                        parts = parts[:-1]
                    parts = parts[: len(parts) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                if base.startswith(PACKAGE):
                    targets.update(resolve(f"{base}.{a.name}") for a in node.names)
        targets.discard(None)
        targets.discard(module)
        graph[module] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_cycle_finder_finds_a_planted_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_package_has_no_import_circle():
    assert cycles(import_graph()) == []


def test_layers_and_models_import_nothing_above_them():
    """Imports point one way: layers and models use the core (errors, schema, storage), each other
    and diffusion's process, never the run config, the trainers or the pipelines above them."""
    core = {f"{PACKAGE}.{m}" for m in ("errors", "schema", "storage")}
    allowed = ("layers", "models", "diffusion")
    offenders = []
    for module, targets in import_graph().items():
        if module.startswith((f"{PACKAGE}.layers", f"{PACKAGE}.models")):
            offenders += [f"{module} -> {t}" for t in sorted(targets)
                          if t not in core and not t.startswith(tuple(f"{PACKAGE}.{a}" for a in allowed))]
    assert not offenders, offenders


def test_every_import_inside_the_package_names_something_that_exists():
    """A moved name must leave no importer behind, including imports inside functions (which
    only fail when that path runs, e.g. ``sample.py``'s diffusion flags once asked
    ``config`` for ``DIFFUSION_SAMPLERS`` after it moved to ``models/dit/transformer.py``)."""
    import importlib

    missing = []
    for folder in (PACKAGE, "configs"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, folder)):
            for name in sorted(f for f in files if f.endswith(".py")):
                path = os.path.join(dirpath, name)
                with open(path) as f:
                    tree = ast.parse(f.read())
                for node in ast.walk(tree):
                    if not (isinstance(node, ast.ImportFrom) and node.level == 0
                            and (node.module or "").startswith(PACKAGE)):
                        continue
                    module = importlib.import_module(node.module)
                    for alias in node.names:
                        if hasattr(module, alias.name):
                            continue
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ModuleNotFoundError:
                            missing.append(f"{os.path.relpath(path, ROOT)}:{node.lineno} "
                                           f"{node.module}.{alias.name}")
    assert not missing, missing


def test_package_imports_sit_at_the_top_unless_a_comment_says_why():
    """Imports at the top of modules, so a module's dependencies are read in one place; a
    function-level import of the package is allowed only with its reason in a comment on its line
    or just above (``main.py`` imports the registry after ``jax.distributed.initialize()``)."""
    unexplained = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, PACKAGE)):
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(dirpath, name)
            with open(path) as f:
                source = f.read()
            lines = source.splitlines()
            for function in ast.walk(ast.parse(source)):
                if not isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                    continue
                for node in ast.walk(function):
                    module = (node.module if isinstance(node, ast.ImportFrom)
                              else node.names[0].name if isinstance(node, ast.Import) else None)
                    if not (module or "").startswith(PACKAGE):
                        continue
                    nearby = lines[max(0, node.lineno - 4):node.end_lineno]
                    if not any("#" in line and "noqa" not in line.split("#", 1)[1] for line in nearby):
                        unexplained.append(f"{os.path.relpath(path, ROOT)}:{node.lineno}")
    assert not unexplained, sorted(set(unexplained))
